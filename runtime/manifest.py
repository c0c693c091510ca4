"""The manifest of a build directory: the only contract between compiler and runtime."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from l4compile.runtime.errors import BuildDirError

MANIFEST_FILE = "manifest.json"
FORMAT = "l4compile-build"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class LayerInfo:
    """Per-layer facts a KV cache needs: chunked layers keep at most `kv_capacity` positions."""

    index: int
    attention: str            # "chunked" | "global"
    kv_capacity: int | None   # chunk size for chunked layers, None (= whole context) for global
    num_kv_heads: int
    head_dim: int
    num_heads: int | None = None   # query heads (sizes a prefill piece's attention scores); None in older builds


@dataclass(frozen=True)
class Manifest:
    model_name: str
    spec_hash: str
    target: str                      # "onnx" | "trt" | "ort-genai" (onnxruntime-genai loads it; Engine refuses)
    backend: str                     # "onnxruntime" | "tensorrt"
    dtype: str
    pipeline: str
    files: dict[str, str]            # role -> file name in the build directory
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    vocab_size: int
    max_position_embeddings: int
    layers: list[LayerInfo]
    tokens: dict[str, Any] = field(default_factory=dict)
    kv_cache: dict[str, Any] | None = None    # None: full-forward build (no incremental decoding)
    weights: str = ""
    compiler_version: str = ""
    spec: dict[str, Any] = field(default_factory=dict)   # the spec, in its YAML layout
    quantization: dict[str, Any] | None = None           # what build --quantize stored quantized; None: nothing
    # target "trt": engine status, precision, limits and profiles (l4compile.trt.profiles); None otherwise
    trt: dict[str, Any] | None = None
    # a sharded build (build --tp N): ranks, segment files and the reductions between them
    # (l4compile.shard.build); None for a single-rank build
    sharding: dict[str, Any] | None = None
    # Text settings from the checkpoint's generation_config.json (l4compile.tokenizer_files): stop_tokens,
    # sampling defaults, max_new_tokens; the tokenizer files themselves are in `files`. None: ids only.
    text: dict[str, Any] | None = None
    # every file of the build but the manifest: {name: {"bytes": int, "sha256": hex}} (runtime/integrity.py);
    # None in builds written before it existed
    checksums: dict[str, dict[str, Any]] | None = None
    # a build with a vision tower: its model files, input/output names, tile geometry and the image token
    # (l4compile.build._vision_manifest); None: a text-only build
    vision: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}, indent=2)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(self.to_json() + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        """Read and type-check a manifest: anything malformed is a BuildDirError naming the file and field."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise BuildDirError(f"{directory}: not a build directory (no {MANIFEST_FILE})")
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BuildDirError(f"{path}: manifest is not valid JSON ({exc})") from None
        except OSError as exc:
            raise BuildDirError(f"{path}: cannot read the manifest ({exc.strerror})") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise BuildDirError(f"{path}: not an l4compile manifest")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise BuildDirError(f"{path}: manifest format {version}, this runtime reads {FORMAT_VERSION}")
        try:
            _check(data, _manifest_schema(), "")
            data["inputs"] = [TensorInfo(**t) for t in data["inputs"]]
            data["outputs"] = [TensorInfo(**t) for t in data["outputs"]]
            data["layers"] = [LayerInfo(**layer) for layer in data["layers"]]
            return cls(**data)
        except _Malformed as exc:
            raise BuildDirError(f"{path}: malformed manifest: {exc}") from None


class _Malformed(Exception):
    pass


def _file_name(value: Any) -> bool:
    """A relative path inside the build directory, like `model.onnx` or `rank0/model.onnx` (an edited
    manifest must not point outside it)."""
    if not isinstance(value, str) or not value or value.startswith("/") or any(c in value for c in "\\\0"):
        return False
    return all(part not in ("", ".", "..") for part in value.split("/"))


def _nonneg_int(value: Any) -> bool:
    """0 <= value < 2**63: every count and id of a build fits int64 (numpy and onnxruntime take no more)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _positive_int(value: Any) -> bool:
    return _nonneg_int(value) and value > 0


def _str(value: Any) -> bool:
    return isinstance(value, str)


def _float_dtype(value: Any) -> bool:
    return value in ("float32", "float16", "bfloat16")


def _optional(check):
    return lambda value: value is None or check(value)


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def _dict_of(check_key, check_value):
    return lambda value: isinstance(value, dict) and all(check_key(k) and check_value(v) for k, v in value.items())


def _fields(required: dict[str, Any], optional: dict[str, Any] | None = None):
    """An object holding `required` fields (and maybe `optional` ones) of the given checks; other fields pass."""
    optional = optional or {}
    return lambda value: (isinstance(value, dict) and all(k in value and check(value[k]) for k, check in required.items())
                          and all(k not in value or check(value[k]) for k, check in optional.items()))


def _record(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"bytes", "sha256"} and _nonneg_int(value["bytes"])
            and isinstance(value["sha256"], str) and len(value["sha256"]) == 64)


_TENSOR = {"name": _str, "dtype": _str, "shape": _list_of(lambda d: _nonneg_int(d) or _str(d))}
_LAYER = {"index": _nonneg_int, "attention": lambda v: v in ("chunked", "global"),
          "kv_capacity": _optional(_positive_int), "num_kv_heads": _positive_int, "head_dim": _positive_int,
          "num_heads": (_optional(_positive_int), False)}
_TOKEN = _optional(_nonneg_int)
# What the runtime reads of a vision build (runtime/vision.py); a rank of a sharded build has no files of its own.
_VISION = _fields({"files": _optional(lambda v: _dict_of(_str, _file_name)(v) and "model" in v),
                   "dtype": _float_dtype, "input": _str,
                   "output": _str, "features_input": _str, "image_size": _positive_int, "patch_size": _positive_int,
                   "num_channels": _positive_int, "tokens_per_tile": _positive_int, "hidden_size": _positive_int,
                   "image_token": _nonneg_int},
                  {"prompt_tokens": _optional(_dict_of(_str, _nonneg_int)), "rank": _nonneg_int})
_SHARDING_FIELDS = _fields({"tp": _positive_int}, {
    "rank": _nonneg_int, "kv_heads_per_rank": _positive_int, "ranks": _list_of(_file_name),
    "segments": _list_of(_file_name),
    "reductions": _list_of(_list_of(lambda pair: _list_of(_str)(pair) and len(pair) == 2))})


def _sharding(value: Any) -> bool:
    """A sharded build's top manifest names its ranks, and one list of reductions per segment
    (runtime/sharded_backend.py); a rank's own manifest says only tp and rank."""
    if not _SHARDING_FIELDS(value) or not value.get("ranks"):
        return _SHARDING_FIELDS(value)
    return ("kv_heads_per_rank" in value and "segments" in value and "reductions" in value
            and len(value["reductions"]) == len(value["segments"]))


# field -> (check, required); sub-schemas (dicts) are for lists of objects
_MANIFEST_SCHEMA: dict[str, tuple[Any, bool]] = {
    "model_name": (_str, True), "spec_hash": (_str, True), "target": (_str, True), "backend": (_str, True),
    "dtype": (_float_dtype, True), "pipeline": (_str, True),
    "files": (_dict_of(_str, _file_name), True), "inputs": (_TENSOR, True), "outputs": (_TENSOR, True),
    "vocab_size": (_positive_int, True), "max_position_embeddings": (_positive_int, True),
    "layers": (_LAYER, True),
    "tokens": (lambda v: isinstance(v, dict) and _TOKEN(v.get("bos")) and _TOKEN(v.get("pad"))
               and _optional(_list_of(_nonneg_int))(v.get("eos")), False),
    "kv_cache": (_optional(lambda v: _dict_of(_str, lambda x: _str(x) or _list_of(_str)(x) or isinstance(x, bool))(v)
                           and _kv_names(v)), False),   # in_place: a bool
    "weights": (_str, False), "compiler_version": (_str, False), "spec": (lambda v: isinstance(v, dict), False),
    "quantization": (_optional(lambda v: isinstance(v, dict)), False),
    "trt": (_optional(lambda v: isinstance(v, dict)), False),
    "checksums": (_optional(_dict_of(_file_name, _record)), False),
    "vision": (_optional(_VISION), False), "sharding": (_optional(_sharding), False),
    "text": (_optional(lambda v: isinstance(v, dict) and _optional(_list_of(_nonneg_int))(v.get("stop_tokens"))
                       and _optional(lambda s: isinstance(s, dict))(v.get("sampling"))), False),
}


def _manifest_schema() -> dict[str, tuple[Any, bool]]:
    """Every field of Manifest (required when it has no default), with its check where one is written
    above; a field added later without a check is accepted as it is."""
    from dataclasses import MISSING, fields
    return {f.name: _MANIFEST_SCHEMA.get(f.name, (lambda value: True,
                                                  f.default is MISSING and f.default_factory is MISSING))
            for f in fields(Manifest)}


def _kv_names(kv: dict) -> bool:
    """The names the runtime binds: present, and the per-layer ones formattable with the layer index."""
    try:
        return (all(_str(kv[k]) for k in ("past_length", "logits_start"))
                and all(_str(kv[k]) and kv[k].format(i=0) != kv[k].format(i=1)
                        for k in ("past_key", "past_value", "new_key", "new_value")))
    except (KeyError, IndexError, ValueError, AttributeError):
        return False


def _check(data: dict, schema: dict, where: str) -> None:
    """Raise _Malformed naming the first field that is missing, unknown or of the wrong type."""
    if not isinstance(data, dict):
        raise _Malformed(f"{where.rstrip('.') or 'manifest'}: expected an object, found {type(data).__name__}")
    for key in data:
        if key not in schema:
            raise _Malformed(f"unknown field {where}{key}")
    for key, spec in schema.items():
        check, required = spec if isinstance(spec, tuple) else (spec, True)
        if key not in data:
            if required:
                raise _Malformed(f"missing field {where}{key}")
            continue
        value = data[key]
        if isinstance(check, dict):   # a list of objects with their own fields
            if not isinstance(value, list):
                raise _Malformed(f"field {where}{key}: expected a list, found {type(value).__name__}")
            for i, item in enumerate(value):
                _check(item, check, f"{where}{key}[{i}].")
        elif not check(value):
            raise _Malformed(f"field {where}{key}: unexpected value {_short(value)}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
