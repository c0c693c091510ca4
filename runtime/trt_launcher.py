"""One TensorRT engine per GPU for a sharded build (build --tp N), joined by one NCCL communicator.

    python -m l4compile.runtime.trt_launcher BUILD_DIR --prompt-ids 1,2,3 --max-new-tokens 16

Starts one process per rank (rank r on GPU r), creates the NCCL communicator from one unique id
(nccl4py's `nccl.core`), hands it to each rank's execution contexts (`set_communicator`, a
PyCapsule "ncclComm_t", as TensorRT's multi-device samples do) and runs the same greedy generation
on every rank: the ranks' collectives meet inside the engines, every rank computes the same logits,
and rank 0 prints the tokens. NOT RUN YET on a multi-GPU host: written against TensorRT 10.16/11's
documented multi-device API; the CPU check of the same split is the host-side reducer
(runtime/sharded_backend.py).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

from l4compile.runtime.errors import BuildDirError
from l4compile.runtime.manifest import Manifest


def unavailable_reason() -> str | None:
    """Why ranks cannot be launched here, in one line, or None."""
    for module, hint in (("tensorrt", "pip install -e '.[trt]'"), ("nccl.core", "pip install nccl4py")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({hint} on a multi-GPU host)"
    return None


def _capsule(pointer: int) -> Any:
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.c_void_p(pointer), b"ncclComm_t", None)


def _rank_main(directory: str, folder: str, rank: int, tp: int, unique_id: Any, prompt: list[int],
               max_new_tokens: int, results: Any) -> None:
    import numpy as np
    import nccl.core as nccl
    from cuda.bindings import runtime as cudart
    from l4compile.runtime.engine import Engine
    from l4compile.runtime.trt_backend import TensorRTBackend
    cudart.cudaSetDevice(rank)
    communicator = nccl.Communicator.init(nranks=tp, rank=rank, unique_id=unique_id)
    rank_dir = Path(directory) / folder
    manifest = Manifest.read(rank_dir)
    backend = TensorRTBackend.load(rank_dir, manifest)
    backend.set_communicator(_capsule(communicator.ptr))
    tokens = Engine(rank_dir, manifest, backend).generate(np.array([prompt]), max_new_tokens)
    if rank == 0:
        results.put(tokens[0].tolist())
    communicator.destroy()


def launch(directory: str | Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy generation on all ranks of a sharded TensorRT build; rank 0's tokens."""
    manifest = Manifest.read(directory)
    sharding = manifest.sharding or {}
    if not sharding.get("ranks"):
        raise BuildDirError(f"{directory}: not a sharded build (build --tp N); run it with `l4compile run`")
    if manifest.backend != "tensorrt":
        raise BuildDirError(f"{directory}: its ranks have no TensorRT engines yet; on the GPU host run: "
                            f"l4compile engine {directory}")
    reason = unavailable_reason()
    if reason is not None:
        raise BuildDirError(f"cannot launch {sharding['tp']} TensorRT ranks here: {reason}; the same split runs on "
                            f"CPU with Engine.load({str(directory)!r}, backend='onnxruntime')")
    import nccl.core as nccl
    context = mp.get_context("spawn")
    results = context.Queue()
    unique_id = nccl.get_unique_id()
    processes = [context.Process(target=_rank_main, args=(str(directory), folder, rank, sharding["tp"], unique_id,
                                                          prompt, max_new_tokens, results))
                 for rank, folder in enumerate(sharding["ranks"])]
    for p in processes:
        p.start()
    tokens = results.get()
    for p in processes:
        p.join()
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l4compile.runtime.trt_launcher",
                                     description="run a sharded TensorRT build, one engine per GPU")
    parser.add_argument("build")
    parser.add_argument("--prompt-ids", required=True, help="e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        tokens = launch(args.build, [int(t) for t in args.prompt_ids.split(",") if t], args.max_new_tokens)
    except BuildDirError as exc:
        print(f"l4compile: error: {exc}", file=sys.stderr)
        return 1
    print(",".join(map(str, tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
