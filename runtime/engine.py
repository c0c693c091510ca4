"""Engine: a loaded build, run with onnxruntime on the CPU by default.

`logits` runs a full forward; `generate` and `stream` prefill once, then decode
token by token against a preallocated KV cache bound to the session with IO
binding (new keys and values are written by the model straight into the cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from l4compile.runtime.errors import BuildDirError, RuntimeInputError
from l4compile.runtime.kv_cache import KVCache
from l4compile.runtime.manifest import Manifest
from l4compile.runtime.sampling import Sampling

ORT_TYPES = {"float32": np.float32, "float16": np.float16}


class Engine:
    """A compiled model ready to run. `Engine.load(build_dir)` reads the manifest and picks the backend."""

    def __init__(self, directory: Path, manifest: Manifest, session) -> None:
        self.directory = directory
        self.manifest = manifest
        self._session = session
        self._kv = manifest.kv_cache

    @classmethod
    def load(cls, directory: str | Path, providers: list[str] | None = None, threads: int | None = None) -> "Engine":
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if manifest.backend != "onnxruntime":
            raise BuildDirError(f"{directory}: backend {manifest.backend!r} is not available in this runtime")
        model = directory / manifest.files["model"]
        if not model.is_file():
            raise BuildDirError(f"{directory}: model file {manifest.files['model']} is missing")
        import onnxruntime as ort
        providers = providers or ["CPUExecutionProvider"]
        if manifest.dtype == "bfloat16" and providers == ["CPUExecutionProvider"]:
            raise BuildDirError(f"{directory}: a bfloat16 build needs a GPU execution provider (onnxruntime's CPU "
                                "provider has no bfloat16 kernels); rebuild with --dtype float16 or float32 for CPU")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model), options, providers=providers)
        return cls(directory, manifest, session)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def max_context(self) -> int:
        return self.manifest.max_position_embeddings

    def check_ids(self, ids: np.ndarray, extra: int = 0) -> np.ndarray:
        """Validate token ids: int [batch, seq], non-empty, inside the vocabulary and the context."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise RuntimeInputError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise RuntimeInputError(f"token ids must have shape [batch, seq], got rank {ids.ndim} {ids.shape}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise RuntimeInputError(f"token ids must be non-empty, got shape {ids.shape}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise RuntimeInputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if ids.shape[1] + extra > self.max_context:
            more = f" + {extra} new tokens" if extra else ""
            raise RuntimeInputError(f"sequence of {ids.shape[1]} tokens{more} exceeds the model's maximum context "
                                    f"{self.max_context}")
        return ids.astype(np.int64, copy=False)

    # ---- forward passes ---------------------------------------------------
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full forward: ids int [batch, seq] -> float32 logits [batch, seq, vocab]."""
        ids = self.check_ids(ids)
        if self._kv is None:
            return self._session.run(["logits"], {"input_ids": ids})[0]
        cache = KVCache(self.manifest, ids.shape[0], ids.shape[1])
        return self._step(ids, cache, logits_start=0)

    def _step(self, ids: np.ndarray, cache: KVCache, logits_start: int) -> np.ndarray:
        """Run `ids` after the cached positions; new keys/values go into the cache."""
        kv = self._kv
        io = self._session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input(kv["past_length"], np.array(cache.length, dtype=np.int64))
        io.bind_cpu_input(kv["logits_start"], np.array(logits_start, dtype=np.int64))
        for layer, (keys, values) in zip(cache.layers, cache.views()):
            io.bind_cpu_input(kv["past_key"].format(i=layer.index), keys)
            io.bind_cpu_input(kv["past_value"].format(i=layer.index), values)
        io.bind_output("logits", "cpu")
        copied = []
        for layer, slot in zip(cache.layers, cache.output_slots(ids.shape[1])):
            names = kv["new_key"].format(i=layer.index), kv["new_value"].format(i=layer.index)
            if slot is None:
                copied.append(layer.index)
                for name in names:
                    io.bind_output(name, "cpu")
            else:
                for name, view in zip(names, slot):
                    io.bind_output(name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)
        self._session.run_with_iobinding(io)
        outputs = io.get_outputs()
        logits = outputs[0].numpy()
        fresh = outputs[1:]
        copies = {}
        for n, index in enumerate(copied):
            copies[[layer.index for layer in cache.layers].index(index)] = (fresh[2 * n].numpy(), fresh[2 * n + 1].numpy())
        cache.commit(ids.shape[1], copies)
        return logits

    # ---- generation -------------------------------------------------------
    def generate(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_tokens: tuple[int, ...] | None = None,
                 callback: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """ids int [batch, seq] -> [batch, seq + n], n <= max_new_tokens (greedy by default).

        Generation stops early once every row has produced a stop token; a finished row is filled
        with its stop token. `callback` receives each step's new tokens [batch].
        """
        ids = self.check_ids(ids, extra=max_new_tokens)
        rows = [ids]
        for tokens in self._decode(ids, max_new_tokens, Sampling(temperature, top_k, top_p), seed, stop_tokens):
            rows.append(tokens[:, None])
            if callback:
                callback(tokens)
        return np.concatenate(rows, axis=1)

    def stream(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None,
               stop_tokens: tuple[int, ...] | None = None) -> Iterator[int]:
        """One prompt (ids [seq]); yields each new token as it is decided."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise RuntimeInputError(f"stream takes one prompt of shape [seq], got shape {ids.shape}")
        ids = self.check_ids(ids[None], extra=max_new_tokens)
        for tokens in self._decode(ids, max_new_tokens, Sampling(temperature, top_k, top_p), seed, stop_tokens):
            yield int(tokens[0])

    def _decode(self, ids: np.ndarray, max_new_tokens: int, sampling: Sampling, seed: int | None,
                stop_tokens: tuple[int, ...] | None) -> Iterator[np.ndarray]:
        if self._kv is None:
            raise BuildDirError(f"{self.directory}: this build has no KV cache; rebuild it to generate")
        if max_new_tokens < 0:
            raise RuntimeInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stops = np.array(sorted(set(stop_tokens if stop_tokens is not None else self.manifest.tokens.get("eos") or [])),
                         dtype=np.int64)
        rng = np.random.default_rng(seed)
        cache = KVCache(self.manifest, ids.shape[0], ids.shape[1] + max_new_tokens)
        done = np.zeros(ids.shape[0], dtype=bool)
        last = np.zeros(ids.shape[0], dtype=np.int64)
        step_ids, start = ids, ids.shape[1] - 1
        for _ in range(max_new_tokens):
            logits = self._step(step_ids, cache, logits_start=start)[:, -1]
            tokens = np.where(done, last, sampling.choose(logits, rng)).astype(np.int64)
            yield tokens
            done |= np.isin(tokens, stops)
            last = tokens
            if done.all():
                return
            step_ids, start = tokens[:, None], 0
