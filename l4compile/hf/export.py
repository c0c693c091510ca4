"""Export weights as a Hugging Face checkpoint that `Llama4ForCausalLM.from_pretrained` loads (or, for a
spec with a vision tower, `Llama4ForConditionalGeneration.from_pretrained`).

This is how trained weights leave the project: from a build directory (the
weights in its ONNX external-data file), from a training run of `l4compile train`
(its latest sharded checkpoint, read whole in one process), or from a trained
GraphModule's state_dict (keys are IR parameter names). Tensors are converted and written one
at a time into safetensors shards (with an index when there are several); the
directory appears complete or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from l4compile.errors import BuildError, WeightError
from l4compile.hf.checkpoint import INDEX_FILE
from l4compile.hf.config import CONFIG_FILE, hf_config_from_spec, hf_multimodal_config_from_spec
from l4compile.hf.safetensors_io import TensorPlan, read_mapped, write_safetensors
from l4compile.progress import current
from l4compile.spec.model import ModelSpec
from l4compile.weights.base import numpy_dtype
from l4compile.weights.hf_mapping import MULTIMODAL_PREFIX, hf_name_of

EXPORT_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class MappedTensor:
    """An IR parameter stored in a file (a build's external data), read only when written out."""

    file: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def read(self, out_dtype: np.dtype, transpose: bool) -> np.ndarray:
        return read_mapped(self.file, self.offset, self.dtype, self.shape, out_dtype, transpose)


@dataclass(frozen=True)
class ArrayTensor:
    """An IR parameter held in memory: a numpy array or a torch tensor (converted when written)."""

    value: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def read(self, out_dtype: np.dtype, transpose: bool) -> np.ndarray:
        value = self.value
        if hasattr(value, "detach"):  # torch, without importing it: numpy cannot hold torch's bfloat16
            value = value.detach().cpu().float().numpy()
        array = np.asarray(value)
        return np.ascontiguousarray((array.T if transpose else array).astype(out_dtype, copy=False))


@dataclass
class ExportReport:
    out_dir: Path
    files: dict[str, int]      # file name -> bytes
    tensors: int


def export_state_dict(state_dict: Mapping[str, Any], spec: ModelSpec, out_dir: str | Path,
                      dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Export a GraphModule's state_dict (IR names, IR layout) for `spec`."""
    return export_checkpoint(spec, {name: ArrayTensor(t) for name, t in state_dict.items()}, out_dir, dtype,
                             max_shard_bytes)


def export_checkpoint(spec: ModelSpec, tensors: Mapping[str, MappedTensor | ArrayTensor], out_dir: str | Path,
                      dtype: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Write config.json and the safetensors shards of `tensors` (every IR parameter of `spec`)."""
    from l4compile.lower import lower
    from l4compile.lower_vision import has_image_input, lower_vision
    from l4compile.runtime import options
    max_shard_bytes = options.size("max_shard_bytes", max_shard_bytes)
    if dtype not in EXPORT_DTYPES:
        raise BuildError(f"unsupported export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    multimodal = has_image_input(spec)   # a Llama4ForConditionalGeneration: text names under language_model.
    params = lower(spec, dtype, kv_cache=False).params() + (lower_vision(spec, dtype).params() if multimodal else [])
    _check_names({p.name for p in params}, set(tensors))
    out_type = numpy_dtype(dtype)
    plans, sources = [], {}
    for param in params:
        mapping = hf_name_of(param.name)
        source = tensors[param.name]
        if source.shape != tuple(param.type.shape):
            raise WeightError(f"tensor {param.name}: shape {list(source.shape)}, the spec needs "
                              f"{list(param.type.shape)}")
        shape = tuple(param.type.shape)[::-1] if mapping.transpose else tuple(param.type.shape)
        hf_name = (MULTIMODAL_PREFIX if multimodal and mapping.text else "") + mapping.hf_name
        plans.append(TensorPlan(hf_name, out_type, shape))
        sources[hf_name] = (source, mapping.transpose)

    def produce(plan: TensorPlan) -> np.ndarray:
        source, transpose = sources[plan.name]
        array = source.read(out_type, transpose)
        task.advance(1, plan.nbytes, plan.name)   # read and converted; its bytes are written next
        return array

    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    shards = _shards(plans, max_shard_bytes)
    from l4compile.outdir import staged
    with staged(out_dir, _check_replaceable) as tmp:   # checked again before the swap
        config = hf_multimodal_config_from_spec(spec, dtype) if multimodal else hf_config_from_spec(spec, dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        with current().phase("write shards", total=len(plans), unit="tensor",
                             size_total=sum(plan.nbytes for plan in plans),
                             detail=f"({len(shards)} safetensors file{'s' if len(shards) > 1 else ''})") as task:
            _write_shards(tmp, shards, produce)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return ExportReport(out_dir, files, len(plans))


def _check_names(expected: set[str], given: set[str]) -> None:
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing:
        raise WeightError(f"missing tensor {missing[0]}: the spec has this parameter, the weights do not"
                          + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise WeightError(f"unexpected tensor {extra[0]}: no parameter of the spec has this name"
                          + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))


def _check_replaceable(out_dir: Path) -> None:
    """An existing `out_dir` is replaced only when it holds nothing but what an export writes (a tokenizer or
    anything else in it would be lost), and never when it is the working directory or above it."""
    from l4compile.outdir import check_named, refuse_current_directory
    check_named(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        refuse_current_directory(out_dir)
        foreign = [p.name for p in out_dir.iterdir() if not _written_by_export(p.name)] if out_dir.is_dir() else [""]
        if foreign:
            raise BuildError(f"{out_dir} exists and holds {foreign[0] or 'a file'}, which an export does not "
                             "write; refusing to overwrite it (choose a new directory)")


def _written_by_export(name: str) -> bool:
    return name in (CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors")


def _shards(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive tensors packed into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


def _write_shards(directory: Path, shards: list[list[TensorPlan]], produce) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` and the index transformers reads."""
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0], produce)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / name, shard, produce)
        weight_map.update({plan.name: name for plan in shard})
    total = sum(plan.nbytes for shard in shards for plan in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def is_training_run(path: str | Path) -> bool:
    """A run directory of `l4compile train`, or one of its checkpoints/step-N directories."""
    path = Path(path)
    return (path / "run.json").is_file() or (path / ".complete").is_file()


def export_from_run(run: str | Path, out_dir: str | Path, dtype: str | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Export the latest checkpoint of a training run (or the given checkpoints/step-N) in float32 unless told."""
    from l4compile.train.checkpoint import latest_checkpoint, load_model_state, run_dir_of, run_spec
    where, _ = latest_checkpoint(Path(run))
    spec = run_spec(run_dir_of(where))
    from l4compile.train.weights import ir_state_dict
    with current().phase("load checkpoint", detail=f"({where.name})"):
        tensors = ir_state_dict(load_model_state(where, spec), spec)
    return export_state_dict(tensors, spec, out_dir, dtype or "float32", max_shard_bytes)


def export_from_build(build_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Export the weights of a build directory (dtype: the build's unless given)."""
    with current().phase("read build"):
        build_dtype, spec, tensors = read_build(Path(build_dir))
    return export_checkpoint(spec, tensors, out_dir, dtype or build_dtype, max_shard_bytes)


def read_build(build_dir: Path) -> tuple[str, ModelSpec, dict[str, MappedTensor]]:
    """A build's dtype, its spec (from the manifest) and where each parameter's bytes are: the
    model's external initializers, located without loading any weight."""
    import onnx
    import yaml
    from l4compile.runtime.manifest import Manifest
    from l4compile.spec.loader import loads_spec
    manifest = Manifest.read(build_dir)
    spec = loads_spec(yaml.safe_dump(manifest.spec, sort_keys=False), source=str(build_dir / "manifest.json"))
    models = [manifest.files["model"]] + ([manifest.vision["files"]["model"]] if manifest.vision else [])
    onnx_dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                   onnx.TensorProto.BFLOAT16: "bfloat16"}
    tensors: dict[str, MappedTensor] = {}
    initializers = [init for file in models
                    for init in onnx.load(str(build_dir / file), load_external_data=False).graph.initializer]
    for init in initializers:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue  # small constants of the graph, not parameters
        where = {entry.key: entry.value for entry in init.external_data}
        if init.data_type not in onnx_dtypes:
            raise WeightError(f"tensor {init.name} in {build_dir}: ONNX dtype {init.data_type} cannot be exported "
                              "(a quantized build? export the unquantized one)")
        tensors[init.name] = MappedTensor(build_dir / where["location"], int(where.get("offset", 0)),
                                          numpy_dtype(onnx_dtypes[init.data_type]), tuple(init.dims))
    return manifest.dtype, spec, tensors
