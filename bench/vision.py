"""Vision benchmark: l4compile's runtime against transformers' Llama4ForConditionalGeneration, same weights, one run.

specs/bench-16e.yaml's text model plus a vision tower of Llama 4's geometry (336-pixel tiles, 14-pixel patches,
144 image features per tile) at reduced width and depth is created with transformers (its own init), saved as
a checkpoint and built by l4compile from it. Both are timed on the same CPU threads, alternating in rounds:
vision encoding of one tile and of four tiles (tower + projector), and time to first token of a prompt with one
one-tile image (encoding, fusion and prefill: 160 tokens). Reported: medians over rounds, and the median of the
per-round ratios.

    python bench/vision.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VISION = dict(image_size=336, patch_size=14, num_channels=3, hidden_size=512, num_layers=8, num_heads=8,
              intermediate_size=2048, vision_output_dim=1024, projector_input_dim=1024, projector_output_dim=1024,
              pixel_shuffle_ratio=0.5, norm_eps=1e-5, rope_theta=10000.0)
TEXT_TOKENS = 16


def make_spec():
    from l4compile.spec import load_spec
    from l4compile.spec.model import TokenSpec, VisionSpec
    spec = load_spec(ROOT / "specs" / "bench-16e.yaml")
    tokens = TokenSpec(bos=spec.tokens.bos, eos=spec.tokens.eos, pad=spec.tokens.pad, image=spec.vocab_size - 1)
    return dataclasses.replace(spec, name="bench-vision", vision=VisionSpec(**VISION), tokens=tokens)


def make_checkpoint(spec, directory: Path):
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration
    from l4compile.hf.config import hf_multimodal_config_from_spec
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(**hf_multimodal_config_from_spec(spec))).eval()
    model.save_pretrained(directory)
    return model


class Theirs:
    def __init__(self, model, image_token: int, attn: str) -> None:
        self.model, self.image_token = model, image_token
        model.config._attn_implementation = attn
        model.language_model.config._attn_implementation = attn
        model.vision_model.config._attn_implementation = attn

    def encode(self, pixels):
        import torch
        with torch.no_grad():
            image = self.model.get_image_features(pixel_values=torch.from_numpy(pixels), return_dict=True)
            image = image.last_hidden_state
            return self.model.multi_modal_projector(image.reshape(-1, image.shape[-1]))

    def first_token(self, ids, pixels):
        import torch
        with torch.no_grad():
            ids_t = torch.from_numpy(ids)
            embeds = self.model.get_input_embeddings()(ids_t)
            mask = (ids_t == self.image_token)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, self.encode(pixels))
            logits = self.model.language_model(inputs_embeds=embeds, logits_to_keep=1).logits
            return logits[:, -1].float().numpy()


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from l4compile.build import BuildOptions, build
    from l4compile.hf import HFCheckpoint
    from l4compile.runtime import Engine
    spec = make_spec()
    with tempfile.TemporaryDirectory(prefix="l4compile-bench-vision-") as tmp:
        model = make_checkpoint(spec, Path(tmp) / "hf")
        build(spec, Path(tmp) / "build", HFCheckpoint.for_spec(Path(tmp) / "hf", spec), BuildOptions(),
              log=lambda _: None)
        engine = Engine.load(Path(tmp) / "build", threads=args.threads)
        per_tile = engine.vision.tokens_per_tile
        rng = np.random.default_rng(0)
        one, four = (rng.standard_normal((n, 3, 336, 336)).astype(np.float32) for n in (1, 4))
        text = rng.integers(3, spec.vocab_size - 1, TEXT_TOKENS)
        ids = np.concatenate([text[:4], np.full(per_tile, spec.tokens.image), text[4:]])[None]
        ours = {
            "encode 1 tile": lambda: engine.encode_images(one),
            "encode 4 tiles": lambda: engine.encode_images(four),
            "first token, 1 image": lambda: engine.generate(ids, max_new_tokens=1, pixel_values=one, stop_tokens=()),
        }
        peers = {attn: Theirs(model, spec.tokens.image, attn) for attn in ("eager", "sdpa")}
        theirs = {attn: {"encode 1 tile": lambda p=p: p.encode(one), "encode 4 tiles": lambda p=p: p.encode(four),
                         "first token, 1 image": lambda p=p: p.first_token(ids, one)} for attn, p in peers.items()}
        ours_logits = engine.logits(ids, pixel_values=one)[:, -1]
        diff = float(np.abs(ours_logits - peers["eager"].first_token(ids, one)).max())
        for fn in list(ours.values()) + [f for d in theirs.values() for f in d.values()]:
            fn()   # warm up
        times = {(who, task): [] for task in ours for who in ["ours", *theirs]}
        for _ in range(args.rounds):
            for task in ours:
                times["ours", task].append(timed(ours[task])[0])
                for attn in theirs:
                    times[attn, task].append(timed(theirs[attn][task])[0])
        print(f"bench-16e text + vision tower (hidden {VISION['hidden_size']}, {VISION['num_layers']} layers, "
              f"336-pixel tiles, {per_tile} features per tile), {args.threads} threads, {args.rounds} rounds; "
              f"last-token logits max |diff| vs transformers: {diff:.2e}")
        print(f"{'task':<24}{'l4compile':>12}{'tf eager':>12}{'tf sdpa':>12}{'vs eager':>10}{'vs sdpa':>10}")
        for task in ours:
            med = {who: float(np.median(times[who, task])) for who in ["ours", *theirs]}
            ratio = {attn: float(np.median(np.array(times[attn, task]) / np.array(times["ours", task])))
                     for attn in theirs}
            print(f"{task:<24}{med['ours'] * 1e3:>10.1f}ms{med['eager'] * 1e3:>10.1f}ms{med['sdpa'] * 1e3:>10.1f}ms"
                  f"{ratio['eager']:>9.2f}x{ratio['sdpa']:>9.2f}x")
        per = float(np.median(times["ours", "encode 4 tiles"])) / 4
        print(f"l4compile vision encoding per tile (4-tile batch): {per * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
