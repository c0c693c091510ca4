"""The files of a build directory, as its manifest records them: size and sha256 of each.

`record` describes the files a build wrote (hashes the compiler computed while writing are passed
in, so the weights are never read back); `check` compares a directory with the records: sizes
always (cheap: one stat per file), checksums when asked (`l4compile verify`, `Engine.load(...,
verify=True)`). Builds written before the records existed carry none: only the presence of their
model and weights files is checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

from l4compile.runtime.errors import BuildDirError

HASH_CHUNK = 16 * 2**20
MANIFEST_FILE = "manifest.json"


class HashingWriter:
    """A binary file that hashes what goes through it (the emitter streams the weights through one)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


def sha256_of(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's sha256; `on_bytes` hears of each chunk read (a progress bar's bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def record(directory: Path, known: Mapping[str, str] | None = None,
           previous: Mapping[str, dict] | None = None, keep: tuple[str, ...] = ()) -> dict[str, dict]:
    """{path: {"bytes", "sha256"}} for every file under `directory` but its manifest (paths relative,
    with `/`: a sharded build's `rank0/model.onnx`).

    `known` gives hashes computed while writing; `previous` records of files named in `keep` are
    reused when the size still matches (a file this step did not write). Others are read and hashed.
    """
    known, previous = known or {}, previous or {}
    records = {}
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if name == MANIFEST_FILE or not path.is_file():
            continue
        size = path.stat().st_size
        old = previous.get(name)
        if name in known:
            digest = known[name]
        elif name in keep and old and old.get("bytes") == size:
            digest = old["sha256"]
        else:
            digest = sha256_of(path)
        records[name] = {"bytes": size, "sha256": digest}
    return records


def check(directory: Path, records: Mapping[str, dict] | None, required: Mapping[str, str],
          checksums: bool = False, on_bytes: Callable[[int], None] | None = None,
          on_file: Callable[[str], None] | None = None) -> None:
    """BuildDirError naming the first file that is missing, of the wrong size or (with `checksums`) damaged.
    While checksumming, `on_bytes` hears of the bytes read and `on_file` of each file checked."""
    directory = Path(directory)
    for role, name in required.items():
        if not (directory / name).is_file():
            raise BuildDirError(f"{directory / name}: the build's {role} file is missing")
    for name, info in (records or {}).items():
        path = directory / name
        if not path.is_file():
            raise BuildDirError(f"{path}: missing (the manifest records {info['bytes']:,} bytes)")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise BuildDirError(f"{path}: {size:,} bytes, the manifest records {info['bytes']:,} "
                                f"({'truncated' if size < info['bytes'] else 'grown'}; rebuild it)")
    if checksums:
        for name, info in (records or {}).items():
            try:
                digest = sha256_of(directory / name, on_bytes)
            except OSError as exc:   # unreadable (permissions) or a failing disk
                raise BuildDirError(f"{directory / name}: cannot read it ({exc.strerror or exc})") from None
            if digest != info["sha256"]:
                raise BuildDirError(f"{directory / name}: checksum mismatch: the file is damaged (rebuild it)")
            if on_file is not None:
                on_file(name)
