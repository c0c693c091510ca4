"""Sharded builds: per-rank graphs from the shard pass (l4compile.passes.shard), their files and plans.

- `segments`: each rank's graph cut at its collectives, for the onnxruntime flavour that the
  runtime's host-side reducer runs (runtime/sharded_backend.py);
- `plan`: per-rank weights and KV cache, and whether each rank fits a GPU (dry runs, inspect --tp);
- `build`: a build directory with one folder per rank;
- `reference`: all ranks of a sharded graph run in lockstep with torch (tests of the pass).
"""
