"""The host-side reducer: every rank of a sharded build (build --tp N) in one process, on onnxruntime.

A test harness, not a distributed runtime: it proves on CPU that the split is exact. Each rank's
graph was cut at its collectives into segments (same cuts, same names on every rank); the reducer
runs segment k of every rank, sums each partial value over the ranks (the all_reduce) and hands the
sum to every rank's next segment. Each rank keeps its own KV heads: the Engine's cache holds all
ranks' heads side by side (rank-major, as the manifest's layers say), and rank r reads and writes
its block of them. A build with a vision tower has one vision encoder (rank 0's; the Engine runs it):
its image features go to every rank, whose text graph fuses them at the image tokens. On GPUs, TensorRT
runs the same graphs with in-engine NCCL collectives (runtime/trt_launcher.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from l4compile.runtime.errors import BuildDirError
from l4compile.runtime.kv_cache import KVCache
from l4compile.runtime.manifest import Manifest


class ShardedOnnxRuntimeBackend:
    def __init__(self, manifest: Manifest, ranks: list[list]) -> None:
        self._kv = manifest.kv_cache
        self._sharding = manifest.sharding
        self._ranks = ranks                  # rank -> its segments' sessions, in order
        self._heads = manifest.sharding["kv_heads_per_rank"]
        self._reductions = [[tuple(pair) for pair in after] for after in manifest.sharding["reductions"]]
        self._inputs = [[[i.name for i in s.get_inputs()] for s in sessions] for sessions in ranks]
        self._outputs = [[[o.name for o in s.get_outputs()] for s in sessions] for sessions in ranks]
        self._features = (manifest.vision or {}).get("features_input")

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, providers: list[str] | None = None,
             threads: int | None = None) -> "ShardedOnnxRuntimeBackend":
        import onnxruntime as ort
        from l4compile.runtime.ort_backend import create_session
        providers = providers or ["CPUExecutionProvider"]
        if manifest.dtype == "bfloat16" and providers == ["CPUExecutionProvider"]:
            raise BuildDirError(f"{directory}: a bfloat16 build needs a GPU execution provider (onnxruntime's CPU "
                                "provider has no bfloat16 kernels); rebuild with --dtype float16 or float32 for CPU")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        ranks = []
        for folder in manifest.sharding["ranks"]:
            sessions = []
            for name in manifest.sharding["segments"]:
                path = Path(directory) / folder / name
                if not path.is_file():
                    raise BuildDirError(f"{directory}: segment {folder}/{name} of the sharded build is missing")
                sessions.append(create_session(path, options, providers, directory))
            ranks.append(sessions)
        return cls(manifest, ranks)

    def _inputs_of_step(self, ids: np.ndarray, image_features: np.ndarray | None) -> dict[str, np.ndarray]:
        """What every rank reads alike: the ids and, in a vision build, the image features (all of them)."""
        return {"input_ids": ids} if image_features is None else {"input_ids": ids, self._features: image_features}

    def forward(self, ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        return self._run([self._inputs_of_step(ids, image_features) for _ in self._ranks])[0]["logits"]

    def step(self, ids: np.ndarray, cache: KVCache, logits_start: int,
             image_features: np.ndarray | None = None) -> np.ndarray:
        """One step of every rank; each rank's new keys/values go into its block of the cache's heads."""
        kv, h = self._kv, self._heads
        feeds = []
        for rank in range(len(self._ranks)):
            feed = {**self._inputs_of_step(ids, image_features),
                    kv["past_length"]: np.array(cache.length, dtype=np.int64),
                    kv["logits_start"]: np.array(logits_start, dtype=np.int64)}
            for layer, (keys, values) in zip(cache.layers, cache.views()):
                heads = slice(rank * h, (rank + 1) * h)
                feed[kv["past_key"].format(i=layer.index)] = np.ascontiguousarray(keys[:, :, heads])
                feed[kv["past_value"].format(i=layer.index)] = np.ascontiguousarray(values[:, :, heads])
            feeds.append(feed)
        envs = self._run(feeds)
        copies = {}
        for position, layer in enumerate(cache.layers):
            copies[position] = tuple(np.concatenate([env[kv[f"new_{part}"].format(i=layer.index)] for env in envs],
                                                    axis=2) for part in ("key", "value"))
        cache.commit(ids.shape[1], copies)
        return envs[0]["logits"]

    def _run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Segment by segment, every rank, then the sums; returns each rank's values by name."""
        envs = [dict(feed) for feed in feeds]
        for k, reductions in enumerate(self._reductions):
            for rank, env in enumerate(envs):
                session = self._ranks[rank][k]
                results = session.run(self._outputs[rank][k], {name: env[name] for name in self._inputs[rank][k]})
                env.update(zip(self._outputs[rank][k], results))
            for partial, total in reductions:
                summed = envs[0][partial].copy()
                for env in envs[1:]:
                    summed += env[partial]
                for env in envs:
                    env[total] = summed
        return envs
