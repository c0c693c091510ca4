"""The safetensors format, read and written one tensor at a time.

A file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`,
then the data region (offsets are relative to its start). We parse the header
ourselves because safetensors' numpy API cannot read bfloat16, and we map a
tensor's bytes only while it is being converted, so that peak memory stays
near one tensor whatever the size of the checkpoint.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from l4compile.errors import WeightError

NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
}
SAFETENSORS_DTYPES = {dtype: code for code, dtype in NUMPY_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit of the reference implementation
MAX_TENSOR_BYTES = 2**63 - 1     # offsets and sizes are file positions (the reference: usize with overflow checks)
CHUNK_BYTES = 64 * 2**20        # bytes mapped and converted at a time


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: absolute offset `start` into `file`."""

    name: str
    file: Path
    dtype: str                 # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numpy_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries and metadata of one file, validated as strictly as the reference library
    (safetensors' `Metadata::validate`): header size within bounds, a JSON object of known dtypes,
    shapes and offsets; string metadata; offsets that, sorted, tile the data section exactly (no
    overlap, no gap, no trailing bytes); byte lengths equal to the shape's element count times the
    dtype's size. Any violation is a WeightError naming the file (and the tensor)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise WeightError(f"{path}: corrupt or truncated safetensors file (header of {length} bytes "
                                  f"in a file of {size})")
            raw = f.read(length)
    except OSError as exc:
        raise WeightError(f"{path}: cannot read ({exc.strerror})") from None
    header = _parse_header(path, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    base = 8 + length
    entries = {name: _entry(path, name, info, base) for name, info in header.items()}
    _check_layout(path, entries, base, size)
    return entries, metadata


def _parse_header(path: Path, raw: bytes) -> dict:
    def unique(pairs: list) -> dict:
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise WeightError(f"{path}: corrupt safetensors header (key {key!r} given twice)")
            seen[key] = value
        return seen
    if not raw.lstrip(b" ").startswith(b"{"):
        raise WeightError(f"{path}: corrupt safetensors header (expected a JSON object)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WeightError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt safetensors header (expected a JSON object)")
    return header


def _entry(path: Path, name: str, info: object, base: int) -> TensorEntry:
    """Validate one header entry on its own (its place among the others: _check_layout)."""
    where = f"tensor {name} in {path}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise WeightError(f"{where}: corrupt header entry (expected dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
        raise WeightError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise WeightError(f"{where}: corrupt header entry (shape {_short(shape)})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightError(f"{where}: corrupt header entry (data_offsets {_short(offsets)})")
    nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize   # exact: Python integers do not overflow
    if nbytes > MAX_TENSOR_BYTES:
        raise WeightError(f"{where}: corrupt header entry (shape {_short(shape)} of {dtype} is "
                          f"{nbytes:.3e} bytes, more than any file can hold)")
    if offsets[1] - offsets[0] != nbytes:
        raise WeightError(f"{where}: corrupt header entry ({offsets[1] - offsets[0]} bytes for "
                          f"{dtype}{shape}, expected {nbytes})")
    return TensorEntry(name, path, dtype, tuple(shape), base + offsets[0], nbytes)


def _check_layout(path: Path, entries: dict[str, TensorEntry], base: int, size: int) -> None:
    """Sorted by offset, the tensors must follow each other from 0 to the end of the file exactly."""
    end, previous = base, None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.start + e.nbytes)):
        if entry.start < end:
            raise WeightError(f"tensor {entry.name} in {path}: corrupt header entry (its data overlaps "
                              f"tensor {previous})")
        if entry.start > end:
            raise WeightError(f"tensor {entry.name} in {path}: corrupt header entry ({entry.start - end} "
                              f"unused bytes before it{f', after tensor {previous}' if previous else ''})")
        if entry.start + entry.nbytes > size:
            raise WeightError(f"tensor {entry.name} in {path}: file is truncated (tensor ends at byte "
                              f"{entry.start + entry.nbytes}, the file has {size})")
        end, previous = entry.start + entry.nbytes, entry.name
    if end != size:
        raise WeightError(f"{path}: corrupt safetensors file ({size - end} bytes after the last tensor's data)")


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_TENSOR_BYTES


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_mapped(file: Path, start: int, dtype: np.dtype, shape: tuple[int, ...], out_dtype: np.dtype,
                transpose: bool = False) -> np.ndarray:
    """A fresh C-contiguous array (of `out_dtype`, transposed if asked) from bytes at `start` of `file`.

    The bytes are memory-mapped and converted CHUNK_BYTES at a time; each chunk's pages are
    dropped from the process right after, so the peak is the output array plus one chunk.
    """
    shape = tuple(shape)
    if transpose and len(shape) != 2:
        raise WeightError(f"{file}: cannot transpose a tensor of shape {shape}")
    out = np.empty(shape[::-1] if transpose else shape, dtype=out_dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return out
    row = shape[-1] if transpose else 1       # a transposed copy moves whole source rows
    per_chunk = max(1, CHUNK_BYTES // (dtype.itemsize * row)) * row
    skew = start % mmap.ALLOCATIONGRANULARITY
    with open(file, "rb") as f, mmap.mmap(f.fileno(), skew + count * dtype.itemsize, access=mmap.ACCESS_READ,
                                          offset=start - skew) as mapped:
        flat = out.reshape(-1) if not transpose else None
        for first in range(0, count, per_chunk):
            n = min(per_chunk, count - first)
            begin = skew + first * dtype.itemsize
            src = np.frombuffer(mapped, dtype=dtype, count=n, offset=begin)
            if transpose:
                rows = first // row
                out[:, rows:rows + n // row] = src.reshape(-1, row).T
            else:
                flat[first:first + n] = src
            del src  # release the buffer before the pages are dropped
            _drop_pages(mapped, begin, n * dtype.itemsize)
    return out


def _drop_pages(mapped: mmap.mmap, begin: int, length: int) -> None:
    """Tell the kernel the pages are no longer needed, so they leave our resident set."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    first = begin - begin % page
    mapped.madvise(mmap.MADV_DONTNEED, first, min(len(mapped), begin + length) - first)


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its name, dtype and shape, known before any data exists."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


Produce = Callable[[TensorPlan], "np.ndarray | Iterable[np.ndarray]"]


def write_safetensors(path: Path, plans: list[TensorPlan], produce: Produce,
                      metadata: dict[str, str] | None = None) -> int:
    """Write a file tensor by tensor: the header first (offsets follow from the plans), then each
    tensor's data as `produce(plan)` yields it (one array, or several chunks in C order).
    Returns the bytes written."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for plan in plans:
        if plan.dtype not in SAFETENSORS_DTYPES:
            raise WeightError(f"tensor {plan.name}: dtype {plan.dtype} cannot be stored in safetensors")
        header[plan.name] = {"dtype": SAFETENSORS_DTYPES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data region to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for plan in plans:
            data = produce(plan)
            written = 0
            for chunk in ([data] if isinstance(data, np.ndarray) else data):
                chunk = np.ascontiguousarray(chunk, dtype=plan.dtype)
                f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
            if written != plan.nbytes:
                raise WeightError(f"tensor {plan.name}: got {written} bytes of data, expected {plan.nbytes} "
                                  f"for {plan.dtype}{list(plan.shape)}")
    return 8 + len(raw) + offset
