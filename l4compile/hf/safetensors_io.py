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
}
SAFETENSORS_DTYPES = {dtype: code for code, dtype in NUMPY_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the limit of the reference implementation
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
    """Tensor entries and metadata of one file; a truncated or corrupt file is a WeightError."""
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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    entries = {name: _entry(path, name, info, base, size) for name, info in header.items()}
    return entries, metadata


def _entry(path: Path, name: str, info: object, base: int, size: int) -> TensorEntry:
    """Validate one header entry against the format and the file's size."""
    where = f"tensor {name} in {path}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise WeightError(f"{where}: corrupt header entry (expected dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in NUMPY_DTYPES:
        raise WeightError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise WeightError(f"{where}: corrupt header entry (shape {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightError(f"{where}: corrupt header entry (data_offsets {offsets!r})")
    nbytes = int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise WeightError(f"{where}: corrupt header entry ({offsets[1] - offsets[0]} bytes for "
                          f"{dtype}{shape}, expected {nbytes})")
    if base + offsets[1] > size:
        raise WeightError(f"{where}: file is truncated (tensor ends at byte {base + offsets[1]}, "
                          f"the file has {size})")
    return TensorEntry(name, path, dtype, tuple(shape), base + offsets[0], nbytes)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
