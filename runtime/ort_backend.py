"""The onnxruntime backend: one step of the model with IO binding, new keys and values written into the cache."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from l4compile.runtime.errors import BuildDirError
from l4compile.runtime.kv_cache import KVCache
from l4compile.runtime.manifest import Manifest


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeBackend:
    """Runs the build's ONNX model in an onnxruntime session (CPU by default)."""

    def __init__(self, manifest: Manifest, session) -> None:
        self._session = session
        self._kv = kv = manifest.kv_cache
        self._features = (manifest.vision or {}).get("features_input")
        self._image_token = (manifest.vision or {}).get("image_token")
        # Input and output names per layer, formatted once rather than on every decode step.
        self._past = {layer.index: (kv["past_key"].format(i=layer.index), kv["past_value"].format(i=layer.index))
                      for layer in manifest.layers} if kv else {}
        self._new = {layer.index: (kv["new_key"].format(i=layer.index), kv["new_value"].format(i=layer.index))
                     for layer in manifest.layers} if kv else {}
        # Logits are written into an array of ours when their last axis is known (no ORT-allocated output to
        # wrap and fetch with every layer's outputs); an in-place cache's buffers are bound once per cache.
        logits = next((o for o in session.get_outputs() if o.name == "logits"), None)
        vocab = logits.shape[-1] if logits is not None and logits.shape else None
        self._logits = (vocab, _NUMPY_TYPES[logits.type]) if isinstance(vocab, int) and logits.type in _NUMPY_TYPES \
            else None
        self._bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, providers: list[str] | None = None,
             threads: int | None = None) -> "OnnxRuntimeBackend":
        if "model" not in manifest.files:
            raise BuildDirError(f"{directory / 'manifest.json'}: the manifest names no model file")
        model = directory / manifest.files["model"]
        if not model.is_file():
            raise BuildDirError(f"{model}: the build's model file is missing")
        import onnxruntime as ort
        providers = providers or ["CPUExecutionProvider"]
        if manifest.dtype == "bfloat16" and providers == ["CPUExecutionProvider"]:
            raise BuildDirError(f"{directory}: a bfloat16 build needs a GPU execution provider (onnxruntime's CPU "
                                "provider has no bfloat16 kernels); rebuild with --dtype float16 or float32 for CPU")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if (manifest.quantization or {}).get("weights") == "fp8" and providers == ["CPUExecutionProvider"]:
            # The CPU provider has no float8 matmul: let constant folding dequantize the fp8 weights once,
            # at load (onnxruntime keeps DequantizeLinear unfolded for QDQ fusion unless told otherwise).
            # The files stay fp8; memory and speed are those of the build's float dtype.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = create_session(model, options, providers, directory)
        check_names(directory, manifest, session)
        return cls(manifest, session)

    def forward(self, ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """A build without a KV cache: ids -> logits."""
        feeds = {"input_ids": ids} if image_features is None else {"input_ids": ids, self._features: image_features}
        return self._session.run(["logits"], feeds)[0]

    def step(self, ids: np.ndarray, cache: KVCache, logits_start: int,
             image_features: np.ndarray | None = None) -> np.ndarray:
        """Run `ids` after the cached positions; new keys/values go into the cache. A vision build's text model
        also reads image features (fused at the image tokens; [0, hidden] for a step without images)."""
        if cache.in_place:
            return self._step_in_place(ids, cache, logits_start, image_features)
        return self._step_sequence_major(ids, cache, logits_start, image_features)

    def _step_in_place(self, ids: np.ndarray, cache: KVCache, logits_start: int,
                       image_features: np.ndarray | None = None) -> np.ndarray:
        """Each piece (cache.pieces) is one run: the model reads every row's cache buffers in place and
        writes the new positions into them (present_* bound to the memory of past_*). Several new tokens
        in a batch run row by row (onnxruntime's attention takes them after cached ones for one row only).
        A vision build's features go with the rows and pieces that hold their image tokens."""
        if ids.shape[1] > 1 and cache.batch > 1:
            rows = [ids[b:b + 1] for b in range(cache.batch)]
            features = split_features(image_features, rows, self._image_token)
            return np.concatenate([self._step_in_place(row, cache.row(b), logits_start, part)
                                   for b, (row, part) in enumerate(zip(rows, features))], axis=0)
        kv, logits, start = self._kv, [], 0
        sizes = cache.pieces(ids.shape[1])
        pieces = np.split(ids, np.cumsum(sizes)[:-1], axis=1)
        features = split_features(image_features, pieces, self._image_token)
        io = self._cache_binding(cache)
        for size, piece, piece_features in zip(sizes, pieces, features):
            io.bind_cpu_input("input_ids", np.ascontiguousarray(piece))
            if piece_features is not None:
                io.bind_cpu_input(self._features, piece_features)
            io.bind_cpu_input(kv["past_length"], np.ascontiguousarray(cache.lengths))
            first = min(max(logits_start - start, 0), size)
            io.bind_cpu_input(kv["logits_start"], np.array(first, dtype=np.int64))
            if self._logits:
                out = np.empty((cache.batch, size - first, self._logits[0]), self._logits[1])
                io.bind_output("logits", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
                self._session.run_with_iobinding(io)
            else:
                io.bind_output("logits", "cpu")
                self._session.run_with_iobinding(io)
                out = io.get_outputs()[0].numpy()
            logits.append(out)
            cache.lengths += size
            start += size
        return logits[0] if len(logits) == 1 else np.concatenate(logits, axis=1)

    def _cache_binding(self, cache: KVCache):
        """An IO binding with `cache`'s buffers bound as every layer's past and present keys and values (written
        in place), made once per cache: a step binds only its ids, lengths and logits."""
        io = self._bindings.get(cache)
        if io is None:
            io = self._session.io_binding()
            io.bind_output("logits", "cpu")   # first: outputs come back in binding order (rebinding keeps it first)
            for layer in cache.layers:
                for past, new, buffer in zip(self._past[layer.index], self._new[layer.index],
                                             (layer.keys, layer.values)):
                    io.bind_cpu_input(past, buffer)
                    io.bind_output(new, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
            self._bindings[cache] = io
        return io

    def _step_sequence_major(self, ids: np.ndarray, cache: KVCache, logits_start: int,
                             image_features: np.ndarray | None = None) -> np.ndarray:
        kv = self._kv
        io = self._session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        if image_features is not None:
            io.bind_cpu_input(self._features, image_features)
        io.bind_cpu_input(kv["past_length"], np.array(cache.length, dtype=np.int64))
        io.bind_cpu_input(kv["logits_start"], np.array(logits_start, dtype=np.int64))
        for layer, (keys, values) in zip(cache.layers, cache.views()):
            key_name, value_name = self._past[layer.index]
            io.bind_cpu_input(key_name, keys)
            io.bind_cpu_input(value_name, values)
        io.bind_output("logits", "cpu")
        copied = []  # positions in cache.layers whose new keys/values come back in onnxruntime's buffers
        for position, (layer, slot) in enumerate(zip(cache.layers, cache.output_slots(ids.shape[1]))):
            names = self._new[layer.index]
            if slot is None:
                copied.append(position)
                for name in names:
                    io.bind_output(name, "cpu")
            else:
                for name, view in zip(names, slot):
                    io.bind_output(name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)
        self._session.run_with_iobinding(io)
        outputs = io.get_outputs()  # in binding order: logits, then each layer's new keys and values
        logits = outputs[0].numpy()
        copies = {p: (outputs[1 + 2 * p].numpy(), outputs[2 + 2 * p].numpy()) for p in copied}
        cache.commit(ids.shape[1], copies)
        return logits


def split_features(features: np.ndarray | None, parts: list[np.ndarray],
                   image_token: int | None) -> list[np.ndarray | None]:
    """Image features [n, hidden] (in the order of the image tokens of the parts, taken one after another)
    cut into each part's own: as many rows as the part has image tokens (None: a build without images)."""
    if features is None:
        return [None] * len(parts)
    counts = [int((part == image_token).sum()) for part in parts]
    ends = np.cumsum(counts).tolist()
    return [np.ascontiguousarray(features[end - count:end]) for count, end in zip(counts, ends)]


def create_session(model: Path, options, providers: list[str], directory: Path) -> "CheckedSession":
    """An onnxruntime session, or one BuildDirError naming the file (onnxruntime's own log stays quiet)."""
    import onnxruntime as ort
    options.log_severity_level = 4   # fatal only: a failure is our one-line BuildDirError, not ORT's log
    try:
        return CheckedSession(ort.InferenceSession(str(model), options, providers=providers), model, directory)
    except Exception as exc:   # onnxruntime raises its own types (Fail, InvalidProtobuf, RuntimeException...)
        raise BuildDirError(f"{model}: onnxruntime cannot load the model ({_first_line(exc)}); the build is "
                            f"damaged or incomplete: check it with `l4compile verify {directory}`, "
                            "or rebuild it") from None


class CheckedSession:
    """An onnxruntime session whose failures while running are one BuildDirError naming the model file.

    Inputs are checked before they reach a session (RuntimeInputError), so what onnxruntime still refuses
    comes from the build: a manifest edited to disagree with its model (a layer's KV capacity, heads or
    layout), or a damaged file that loaded."""

    def __init__(self, session, model: Path, directory: Path) -> None:
        self.session, self.model, self.directory = session, model, directory

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        try:
            return self.session.run(*args, **kwargs)
        except _onnxruntime_errors() as exc:
            raise self._error(exc) from None

    def run_with_iobinding(self, binding, *args):
        try:
            return self.session.run_with_iobinding(binding, *args)
        except _onnxruntime_errors() as exc:
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> BuildDirError:
        return BuildDirError(f"{self.model}: onnxruntime failed running the model ({_first_line(exc)}); if the "
                             f"build was edited or damaged, `l4compile verify {self.directory}` checks its files, "
                             "else rebuild it")


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's exception types: its own classes, the RuntimeError of a failed run_with_iobinding and the
    ValueError of a feed that misses an input."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    return (RuntimeError, ValueError,
            *(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)))


def check_names(directory: Path, manifest: Manifest, session) -> None:
    """The names the backend binds (the manifest's KV cache names for its layers, input_ids, logits) must be the
    model's, and every input of the model must be one of them: else a BuildDirError naming the manifest field
    (an edited manifest would fail inside onnxruntime at the first step)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    kv = manifest.kv_cache
    bound = {"input_ids": "inputs", "logits": "outputs"}
    if kv:
        bound.update({kv["past_length"]: "kv_cache.past_length", kv["logits_start"]: "kv_cache.logits_start"})
        for layer in manifest.layers:
            for part in ("past_key", "past_value", "new_key", "new_value"):
                bound[kv[part].format(i=layer.index)] = f"kv_cache.{part} of layers[{layer.index}]"
    features = (manifest.vision or {}).get("features_input")
    if features:
        bound[features] = "vision.features_input"
    where = f"{directory / 'manifest.json'}: malformed manifest"
    for name, field in bound.items():
        if name not in inputs and name not in outputs:
            raise BuildDirError(f"{where}: {field} names {name!r}, which {manifest.files['model']} does not have")
    unbound = sorted(set(inputs) - set(bound))
    if unbound:
        raise BuildDirError(f"{where}: {manifest.files['model']} takes input {unbound[0]!r}, which no field of the "
                            "manifest names (its layers or kv_cache were edited)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
