"""Training benchmark: l4compile's training model against transformers' Llama4ForCausalLM, same weights, one run.

A random transformers model of specs/bench-16e.yaml (~118M parameters, 16 experts) is saved; each engine loads
it (l4compile's parameter names are transformers', so the state_dict maps 1:1) and runs full training steps
(forward, cross-entropy, backward, AdamW step) on the same random batch, same threads. Each measurement is a
fresh subprocess (peak RSS is that process's ru_maxrss; on a GPU, torch.cuda.max_memory_allocated); engines
alternate in rounds and the ratio reported is the median over rounds. Each step is timed in wall-clock and in
process CPU time: on a shared machine the CPU-time ratio is the stable one (other jobs inflate wall time, not
CPU time; with --threads 1 it is the work done).

    python bench/train.py [--spec specs/bench-16e.yaml] [--batch 2] [--seq 512] [--steps 3] [--rounds 2]
                          [--threads 2] [--device cpu|cuda] [--attn sdpa|eager]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(spec_path: Path, directory: Path) -> None:
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    from l4compile.hf import hf_config_from_spec
    from l4compile.spec import load_spec
    torch.manual_seed(0)
    config = Llama4TextConfig(**hf_config_from_spec(load_spec(spec_path)))
    Llama4ForCausalLM(config).save_pretrained(directory)


def measure(engine: str, spec_path: str, checkpoint: str, args) -> dict:
    """One engine, in this (fresh) process: warm-up step, then `steps` timed steps."""
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from transformers import Llama4ForCausalLM
    reference = Llama4ForCausalLM.from_pretrained(checkpoint, attn_implementation=args.attn)
    vocab = reference.config.vocab_size
    if engine == "l4compile":
        from l4compile.spec import load_spec
        from l4compile.train.loss import cross_entropy_sum, labelled_tokens
        from l4compile.train.model import Llama4ForTraining
        model = Llama4ForTraining(load_spec(spec_path))
        model.load_state_dict(reference.state_dict())
        del reference

        def loss_of(ids):
            logits, _ = model(ids)
            return cross_entropy_sum(logits, ids) / labelled_tokens(ids)
    else:
        model = reference

        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss
    model.to(device).train()
    # fused AdamW for both: transformers' Trainer defaults to it (optim=adamw_torch_fused), and so does `l4compile train`
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    losses, times, cpu_times = [], [], []
    for step in range(args.steps + 1):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"engine": engine, "step_s": statistics.median(times), "tokens_per_s": args.batch * args.seq / statistics.median(times),
            "cpu_s": statistics.median(cpu_times), "peak_bytes": peak, "first_loss": losses[0]}


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "bench-16e.yaml"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.spec, args.child[1], args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(args.spec), Path(tmp))
        rounds = []
        for r in range(args.rounds):
            result = {}
            for engine in ("l4compile", "transformers"):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--child", engine, tmp]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                result[engine] = json.loads(out.strip().splitlines()[-1])
                m = result[engine]
                print(f"round {r + 1}  {engine:<13} {m['tokens_per_s']:8.0f} tokens/s  step {m['step_s']:.2f} s  "
                      f"peak {m['peak_bytes'] / 2**20:7.0f} MiB  first loss {m['first_loss']:.6f}", flush=True)
            rounds.append(result)
    speed = statistics.median(r["l4compile"]["tokens_per_s"] / r["transformers"]["tokens_per_s"] for r in rounds)
    cpu = statistics.median(r["transformers"]["cpu_s"] / r["l4compile"]["cpu_s"] for r in rounds)
    memory = statistics.median(r["l4compile"]["peak_bytes"] / r["transformers"]["peak_bytes"] for r in rounds)
    print(f"{Path(args.spec).stem}, batch {args.batch} x {args.seq} tokens, {args.threads} threads, {args.device}, "
          f"transformers {args.attn}: l4compile {speed:.2f}x the training tokens/s ({cpu:.2f}x per CPU second), "
          f"{memory:.2f}x the peak memory "
          f"(median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
