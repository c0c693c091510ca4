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


@dataclass(frozen=True)
class Manifest:
    model_name: str
    spec_hash: str
    target: str                      # "onnx" | "trt"
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

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}, indent=2)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(self.to_json() + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise BuildDirError(f"{directory}: not a build directory (no {MANIFEST_FILE})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BuildDirError(f"{path}: manifest is not valid JSON ({exc})") from None
        if data.pop("format", None) != FORMAT:
            raise BuildDirError(f"{path}: not an l4compile manifest")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise BuildDirError(f"{path}: manifest format {version}, this runtime reads {FORMAT_VERSION}")
        try:
            data["inputs"] = [TensorInfo(**t) for t in data["inputs"]]
            data["outputs"] = [TensorInfo(**t) for t in data["outputs"]]
            data["layers"] = [LayerInfo(**layer) for layer in data["layers"]]
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise BuildDirError(f"{path}: malformed manifest ({exc})") from None
