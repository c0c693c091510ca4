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
        check_names(directory, manifest, ranks)
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


def check_names(directory: Path, manifest: Manifest, ranks: list[list]) -> None:
    """Every value a segment takes must come from the manifest's names (ids, KV cache of its layers, image
    features) or from an earlier segment or reduction, and the layers' KV heads must be the ranks' together:
    else the manifest was edited to disagree with the segments, and this says where, before any step runs."""
    sharding, kv, where = manifest.sharding, manifest.kv_cache, f"{directory / 'manifest.json'}: malformed manifest"
    heads = sharding["kv_heads_per_rank"] * len(ranks)
    for layer in manifest.layers:
        if layer.num_kv_heads != heads:
            raise BuildDirError(f"{where}: layers[{layer.index}].num_kv_heads is {layer.num_kv_heads}, but "
                                f"{len(ranks)} ranks of {sharding['kv_heads_per_rank']} KV heads hold {heads}")
    given, needed = {"input_ids"}, {"logits"}
    if manifest.vision:
        given.add(manifest.vision["features_input"])
    if kv:
        given |= {kv["past_length"], kv["logits_start"]}
        given |= {kv[part].format(i=layer.index) for layer in manifest.layers for part in ("past_key", "past_value")}
        needed |= {kv[part].format(i=layer.index) for layer in manifest.layers for part in ("new_key", "new_value")}
    for folder, sessions in zip(sharding["ranks"], ranks):
        available = set(given)
        for segment, session, reductions in zip(sharding["segments"], sessions, sharding["reductions"]):
            missing = [i.name for i in session.get_inputs() if i.name not in available]
            if missing:
                raise BuildDirError(f"{where}: {folder}/{segment} takes {missing[0]!r}, which neither its layers and "
                                    "kv_cache nor an earlier segment give")
            available |= {o.name for o in session.get_outputs()}
            missing = [partial for partial, _ in reductions if partial not in available]
            if missing:
                raise BuildDirError(f"{where}: sharding.reductions sums {missing[0]!r}, which {folder}/{segment} "
                                    "does not give")
            available |= {total for _, total in reductions}
        absent = sorted(needed - available)
        if absent:
            raise BuildDirError(f"{where}: the runtime reads {absent[0]!r} (its layers and kv_cache), which no "
                                f"segment of {folder} gives")
