"""A WeightSource over a Hugging Face safetensors checkpoint directory.

One `model.safetensors`, or shards listed by `model.safetensors.index.json`;
text-only names (`model.layers.0...`) or multimodal ones (`language_model.`
prefix). Headers are read up front (cheap, and every structural problem shows
before a build writes anything); tensor data is mapped and converted only
when the emitter asks for it, one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from l4compile.errors import WeightError
from l4compile.hf.safetensors_io import TensorEntry, read_header, read_mapped
from l4compile.ir.graph import Value
from l4compile.spec.model import ModelSpec
from l4compile.weights.base import WeightSource, numpy_dtype
from l4compile.weights.hf_mapping import MULTIMODAL_PREFIX, hf_name_of, unused_by_text_model

INDEX_FILE = "model.safetensors.index.json"
FLOAT_SOURCES = ("F64", "F32", "F16", "BF16")  # converted to the build dtype


class HFCheckpoint(WeightSource):
    """IR parameters read from an HF checkpoint, converted to the IR dtype and layout."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.entries = read_checkpoint_entries(self.directory)
        index = self.directory / INDEX_FILE
        files = sorted({entry.file for entry in self.entries.values()})
        self.where = str(index) if index.is_file() else (str(files[0]) if len(files) == 1 else
                                                         f"any of the {len(files)} files in {self.directory}")
        multimodal = any(name.startswith(MULTIMODAL_PREFIX) for name in self.entries)
        self.prefix = MULTIMODAL_PREFIX if multimodal else ""
        self.description = f"hf:{self.directory}"

    @classmethod
    def for_spec(cls, directory: str | Path, spec: ModelSpec, dtype: str = "float32") -> "HFCheckpoint":
        """Open a checkpoint for `spec` and check it fully before any data is read: its config.json
        (if any) describes the same math, every parameter is there with its shape, nothing is left over."""
        from l4compile.hf.config import check_config_matches
        from l4compile.lower import lower
        from l4compile.lower_vision import has_image_input, lower_vision
        checkpoint = cls(directory)
        check_config_matches(checkpoint.directory, spec)
        params = lower(spec, dtype).params() + (lower_vision(spec, dtype).params() if has_image_input(spec) else [])
        checkpoint.verify(params, spec.tie_word_embeddings)
        return checkpoint

    def entry_for(self, param: Value) -> tuple[TensorEntry, bool]:
        """The checkpoint tensor behind an IR parameter (shape-checked) and whether it is transposed."""
        mapping = hf_name_of(param.name)
        name = (self.prefix if mapping.text else "") + mapping.hf_name
        entry = self.entries.get(name)
        if entry is None:
            raise WeightError(f"missing tensor {name} (for parameter {param.name}): not in {self.where}")
        want = tuple(param.type.shape)
        want = want[::-1] if mapping.transpose else want
        if entry.shape != want:
            raise WeightError(f"tensor {name} in {entry.file}: shape {list(entry.shape)}, the spec needs "
                              f"{list(want)}")
        if entry.dtype not in FLOAT_SOURCES:
            raise WeightError(f"tensor {name} in {entry.file}: dtype {entry.dtype} is not supported "
                              f"(expected one of {', '.join(FLOAT_SOURCES)})")
        return entry, mapping.transpose

    def verify(self, params: Iterable[Value], tie_word_embeddings: bool) -> None:
        """Every parameter has its tensor (right shape and dtype); no checkpoint tensor is left unbound."""
        bound = {self.entry_for(param)[0].name for param in params}
        for name, entry in self.entries.items():
            if name not in bound and not unused_by_text_model(name, tie_word_embeddings):
                raise WeightError(f"unexpected tensor {name} in {entry.file}: no parameter of the spec reads it")

    def get(self, param: Value) -> np.ndarray:
        entry, transpose = self.entry_for(param)
        return read_mapped(entry.file, entry.start, entry.numpy_dtype, entry.shape,
                           numpy_dtype(param.type.dtype), transpose)

    def get_slice(self, param: Value, axis: int, start: int, stop: int) -> np.ndarray:
        """A rank's slice, reading only its bytes where the slice is a run of the stored tensor's
        leading axis (stacked experts; transposed linears' columns); otherwise the whole tensor."""
        entry, transpose = self.entry_for(param)
        if (1 - axis if transpose else axis) != 0:
            return super().get_slice(param, axis, start, stop)
        row = int(np.prod(entry.shape[1:], dtype=np.int64)) * entry.numpy_dtype.itemsize
        return read_mapped(entry.file, entry.start + start * row, entry.numpy_dtype,
                           (stop - start,) + tuple(entry.shape[1:]), numpy_dtype(param.type.dtype), transpose)


def read_checkpoint_entries(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint directory by name: through the index when there is one,
    else from every *.safetensors file in it."""
    if not directory.is_dir():
        raise WeightError(f"checkpoint directory {directory} does not exist")
    index = directory / INDEX_FILE
    if index.is_file():
        return _indexed_entries(directory, index)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightError(f"checkpoint {directory}: no *.safetensors file and no {INDEX_FILE}")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in read_header(file)[0].items():
            if name in entries:
                raise WeightError(f"tensor {name} is in both {entries[name].file} and {file}")
            entries[name] = entry
    return entries


def _indexed_entries(directory: Path, index: Path) -> dict[str, TensorEntry]:
    """The index's weight_map, checked against the shards' own headers in both directions."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise WeightError(f"{index}: corrupt index (expected JSON with a weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightError(f"{index}: corrupt index (weight_map must map tensor names to file names)")
    headers: dict[str, dict[str, TensorEntry]] = {}
    for file_name in sorted(set(weight_map.values())):
        shard = directory / file_name
        if not shard.is_file():
            tensor = next(name for name, f in weight_map.items() if f == file_name)
            raise WeightError(f"tensor {tensor}: shard {shard} listed in {index.name} does not exist")
        headers[file_name] = read_header(shard)[0]
    entries: dict[str, TensorEntry] = {}
    for name, file_name in weight_map.items():
        if name not in headers[file_name]:
            raise WeightError(f"tensor {name}: listed in {index.name} but not in {directory / file_name}")
        entries[name] = headers[file_name][name]
    for file_name, header in headers.items():
        for name in header:
            if weight_map.get(name) != file_name:
                raise WeightError(f"unexpected tensor {name} in {directory / file_name}: not listed for this "
                                  f"file in {index.name}")
    return entries


