"""`l4compile quant-report`: a quantized build against its unquantized reference, on the same prompts.

Both builds run in onnxruntime through the runtime's Engine (a full forward per prompt batch).
Reported: logits cosine similarity per token position (mean and worst), top-1 agreement, max and
mean absolute logit error, and the size of each build's files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from l4compile.errors import BuildError
from l4compile.progress import current
from l4compile.quant.calibrate import token_batches

REPORT_SEED = 0   # the fixed prompts (calibration draws its own, with another seed)


def logits_agreement(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Cosine per position, top-1 agreement and absolute error of logits [..., vocab]."""
    dot = (got * want).sum(-1)
    cosine = dot / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1), 1e-30)
    error = np.abs(got - want)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}


def _files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


def compare_builds(build_dir: str | Path, reference_dir: str | Path, batches: int = 4, batch_size: int = 2,
                   seq_len: int = 64, threads: int | None = None) -> dict:
    """The report as plain data (what `quant-report --json` prints)."""
    from l4compile.runtime import Engine
    progress = current()
    build_dir, reference_dir = Path(build_dir), Path(reference_dir)
    with progress.phase("load builds"):
        engine, reference = Engine.load(build_dir, threads=threads), Engine.load(reference_dir, threads=threads)
    if engine.manifest.spec_hash != reference.manifest.spec_hash:
        raise BuildError(f"{build_dir} ({engine.manifest.model_name}) and {reference_dir} "
                         f"({reference.manifest.model_name}) are builds of different specs")
    seq_len = min(seq_len, engine.max_context)
    prompts = token_batches(engine.vocab_size, batches, batch_size, seq_len, REPORT_SEED)
    got, want = _logits(engine, prompts, "run build"), _logits(reference, prompts, "run reference")
    files, ref_files = _files(build_dir), _files(reference_dir)
    weights_file = engine.manifest.files["weights"]
    return {
        "build": str(build_dir), "reference": str(reference_dir),
        "quantization": engine.manifest.quantization, "reference_quantization": reference.manifest.quantization,
        "prompts": {"batches": batches, "batch_size": batch_size, "seq_len": seq_len, "seed": REPORT_SEED},
        **logits_agreement(got, want),
        "weight_bytes": files.get(weights_file, 0), "reference_weight_bytes": ref_files.get(weights_file, 0),
        "files": files, "reference_files": ref_files,
    }


def _logits(engine, prompts: list[np.ndarray], phase: str) -> np.ndarray:
    """A full forward of each prompt batch: one phase, counting batches and tokens."""
    out = []
    with current().phase(phase, total=len(prompts), unit="batch", size_total=sum(p.size for p in prompts),
                         size_unit="token") as task:
        for ids in prompts:
            out.append(engine.logits(ids))
            task.advance(1, ids.size)
    return np.concatenate(out)


def format_comparison(report: dict) -> str:
    from l4compile.inspect import format_bytes

    def what(quantization: dict | None) -> str:
        if not quantization:
            return "not quantized"
        method = f" by {quantization['method']}" if quantization.get("method") else ""
        blocks = f" in blocks of {quantization['block_size']}" if quantization.get("block_size") else ""
        parts = [f"{quantization['weights']} weights{method}{blocks}"]
        parts += [f"{quantization['activations']} activations"] if quantization.get("activations") else []
        for table, key in (("embeddings", "embedding"), ("lm_head", "lm_head")):
            if f"{key}_bits" in quantization:
                parts.append(f"{table} {quantization[f'{key}_bits']}-bit blocks of {quantization[f'{key}_block_size']}")
            elif table == "embeddings" and quantization.get("embeddings"):
                parts.append(f"{quantization['embeddings']} embeddings")
        parts += ["lm_head kept in high precision"] if quantization.get("lm_head") == "kept" else []
        return ", ".join(parts)
    p = report["prompts"]
    ratio = report["weight_bytes"] / max(report["reference_weight_bytes"], 1)
    total, ref_total = sum(report["files"].values()), sum(report["reference_files"].values())
    return "\n".join([
        f"build      {report['build']}  ({what(report['quantization'])})",
        f"reference  {report['reference']}  ({what(report['reference_quantization'])})",
        f"prompts    {p['batches'] * p['batch_size']} x {p['seq_len']} random token ids (seed {p['seed']})",
        f"logits cosine     mean {report['cosine_mean']:.5f}   worst position {report['cosine_min']:.5f}",
        f"top-1 agreement   {report['top1_agreement']:.1%}",
        f"abs logit error   max {report['max_abs_error']:.4f}   mean {report['mean_abs_error']:.4f}",
        f"weights file      {format_bytes(report['weight_bytes'])} vs {format_bytes(report['reference_weight_bytes'])}"
        f"  ({ratio:.3f}x)",
        f"all files         {format_bytes(total)} vs {format_bytes(ref_total)}  ({total / max(ref_total, 1):.3f}x)",
    ]) + "\n"


def q4_0_bytes(spec) -> int:
    """What llama.cpp's `llama-quantize ... Q4_0` stores for `spec`'s text model (llama-quant.cpp's defaults):
    every matrix, the embedding table (token_embd) included, in blocks of 32 at 18 bytes (4.5 bits a weight),
    except the output matrix (lm_head): Q6_K (210 bytes a block of 256), or Q8_0 (34 bytes a block of 32)
    where its rows are not a multiple of 256; the router and the norms in float32."""
    from l4compile.lower import lower

    def stored(v) -> int:
        if v.type.rank < 2 or v.init in ("router", "norm"):
            return v.type.numel() * 4
        if v.name == "lm_head":
            return v.type.numel() * 210 // 256 if spec.hidden_size % 256 == 0 else v.type.numel() * 34 // 32
        return v.type.numel() * 18 // 32
    return sum(stored(v) for v in lower(spec, kv_cache=False).params())
