"""Full-size dry runs: time and peak memory of `l4compile build SPEC --dry-run --dtype bfloat16`.

Each dry run is a fresh process running the CLI's `main`; reported per spec and target (medians over
rounds): the whole process's wall and CPU seconds (interpreter start-up included), the seconds its
imports took (the CLI and the compiler it loads lazily: l4compile.build, onnx, networkx), the seconds
`main` took after them (load the spec, lower, run the passes, emit the ONNX without weights, run the
ONNX checker and, for trt, the compatibility check), and the process's peak RSS (VmHWM).

    python bench/dry_run.py [--specs scout maverick behemoth] [--targets onnx trt] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(spec: str, target: str) -> None:
    """One dry run in this process; prints its own timing and peak RSS as JSON."""
    wall, cpu = time.perf_counter(), time.process_time()
    import l4compile.build  # noqa: F401  (what `main` would import lazily)
    from l4compile.cli import main
    imports, imports_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(["build", str(ROOT / "specs" / f"{spec}.yaml"), "--target", target, "--dry-run",
                       "--dtype", "bfloat16"])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    status_text = Path("/proc/self/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status_text.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"status": status, "imports_s": imports, "imports_cpu_s": imports_cpu, "main_s": wall,
                      "main_cpu_s": cpu, "peak_rss_mb": hwm_kb / 1024}))


def measure(spec: str, target: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", spec, target], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["status"] != 0:
        raise SystemExit(f"dry run of {spec} --target {target} failed: {out.stderr}")
    return {**result, "process_s": wall, "process_cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=["scout", "maverick", "behemoth"])
    parser.add_argument("--targets", nargs="+", default=["onnx", "trt"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):                 # specs and targets alternate within each round
        for spec in args.specs:
            for target in args.targets:
                runs.setdefault((spec, target), []).append(measure(spec, target))
    print(f"seconds wall / CPU, medians of {args.rounds} rounds")
    print(f"{'spec':<10}{'target':<8}{'process':>14}{'imports':>14}{'dry run (main)':>16}{'peak RSS MB':>13}")
    for (spec, target), results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "status"}
        print(f"{spec:<10}{target:<8}{med['process_s']:>7.2f} / {med['process_cpu_s']:<4.2f}"
              f"{med['imports_s']:>7.2f} / {med['imports_cpu_s']:<4.2f}"
              f"{med['main_s']:>9.2f} / {med['main_cpu_s']:<4.2f}{med['peak_rss_mb']:>13.0f}")


if __name__ == "__main__":
    main()
