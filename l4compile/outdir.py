"""Where a build (or an export) is written, without ever losing a user's files.

- An existing output is replaced only when it is unmistakably an l4compile build: a manifest that
  parses as one, in a directory holding nothing but the files that build recorded. Anything else
  is refused unless the caller passes `force`.
- The output is written to a temporary directory beside it, `.NAME.tmp-PID-<random suffix>`, and swapped into
  place at the end (an atomic exchange where the OS has one): at every moment the output is the old
  build or the new one. The PID in the name lets the next build into the same parent remove the
  temporaries of builds that were killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from l4compile.errors import BuildError

MANIFEST_FILE = "manifest.json"
MAX_NAME_BYTES = 200   # a file name is at most 255 bytes; the temporary directory adds ~20
# Exactly the names staging_dir (mkdtemp's 8-character suffix) and replace_dir give: a user's `.x.tmp-1-notes` is
# not ours to remove.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp-(?P<pid>\d+)-[a-z0-9_]{8}|old-(?P<old>\d+)-0)$")
_RENAME_EXCHANGE = 2


def default_output(spec_name: str, root: Path = Path("build")) -> Path:
    """`build/<spec name>`, refusing a name that is not a single safe directory name."""
    reason = None
    if "\0" in spec_name or any(ord(c) < 32 for c in spec_name):
        reason = "it holds control characters"
    elif "/" in spec_name or "\\" in spec_name:
        reason = "it holds a path separator"
    elif spec_name.strip() in ("", ".", "..") or spec_name.startswith("."):
        reason = "it is empty or starts with '.'"
    elif len(spec_name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        reason = f"it is longer than {MAX_NAME_BYTES} bytes"
    if reason:
        raise BuildError(f"spec name {_show(spec_name)} cannot be the default output directory under {root}/ "
                         f"({reason}); pass -o DIR")
    return root / spec_name


def _show(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "...'"


def recorded_files(directory: Path) -> set[str] | None:
    """The files the l4compile build in `directory` recorded, or None when it is not one."""
    try:
        data = json.loads((directory / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    from l4compile.runtime.manifest import FORMAT
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    files = data.get("checksums") or {}
    roles = data.get("files") or {}
    if not isinstance(files, dict) or not isinstance(roles, dict):
        return None
    # Builds from before the checksums recorded only their model and weights (and a TensorRT report).
    legacy = {"compat.json", "compat.txt"} if data.get("target") == "trt" and not files else set()
    return {MANIFEST_FILE, *map(str, files), *map(str, roles.values()), *legacy}


def check_replaceable(out_dir: Path, force: bool = False, flag: str = "--force") -> str | None:
    """None when `out_dir` is free; a one-line notice when it holds an older build that will be replaced.

    Anything else (a file, a directory that is not a build, a build with files it did not write) is a
    BuildError naming the path and `flag`; with `force` it is replaced, and the notice says what goes.
    """
    out_dir = Path(out_dir)
    check_named(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return None
    refuse_current_directory(out_dir, flag)
    if not out_dir.is_dir() or out_dir.is_symlink():
        if force:
            return f"replacing {out_dir} ({flag})"
        kind = "a symbolic link" if out_dir.is_symlink() else "not a directory"
        raise BuildError(f"{out_dir} exists and is {kind}; refusing to replace it (remove it, choose "
                         f"another -o, or pass {flag})")
    recorded = recorded_files(out_dir)
    try:   # the whole tree only for a build (a sharded one has rankN/ folders); else the top level
        found = out_dir.rglob("*") if recorded is not None else out_dir.iterdir()
        entries = sorted(p.relative_to(out_dir).as_posix() for p in found)
    except OSError as exc:
        raise BuildError(f"{out_dir}: cannot list it ({exc.strerror})") from None
    folders = {name.rsplit("/", 1)[0] for name in recorded or () if "/" in name}
    foreign = [name for name in entries if recorded is None or _foreign(out_dir / name, name, recorded, folders)]
    foreign = [name for name in foreign if "/" not in name or name.split("/", 1)[0] not in foreign]
    if recorded is not None and not foreign:
        return f"replacing the older build at {out_dir}"
    listed = f"{foreign[0]}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "") if foreign else ""
    if force:
        return f"replacing {out_dir} ({flag})" + (f": deleting {listed}" if foreign else "")
    if recorded is None:
        what = (f"is not an l4compile build directory (no l4compile {MANIFEST_FILE}; "
                f"{'it is empty' if not entries else 'it holds ' + listed})")
    else:
        what = f"holds files its build did not write ({listed})"
    raise BuildError(f"{out_dir} {what}; refusing to replace it (move them away, choose another -o, "
                     f"or pass {flag})")


def refuse_current_directory(out_dir: Path, flag: str | None = None) -> None:
    """The working directory or one above it (`-o .`, `-o ..`, `-o /`) is never replaced, even with `flag`: the
    swap would leave this process, and the shell that started it, in a deleted directory."""
    where = Path(os.path.realpath(out_dir))
    cwd = Path(os.path.realpath(os.getcwd()))
    if where == cwd or where in cwd.parents:
        even = f", even with {flag}" if flag else ""
        raise BuildError(f"{out_dir} is the current directory or one above it; refusing to replace it{even} "
                         "(choose another -o)")


def _foreign(path: Path, name: str, recorded: set[str], folders: set[str]) -> bool:
    if path.is_symlink():
        return True
    if path.is_dir():
        return name not in folders
    return name not in recorded


def staging_dir(out_dir: Path) -> Path:
    """A fresh temporary directory beside `out_dir`, after removing the temporaries of dead builds there. Its
    permissions are those of a directory made with mkdir (mkdtemp's are 0700: a build nobody else could read)."""
    out_dir = Path(out_dir)
    check_named(out_dir)
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())
        return tmp
    except OSError as exc:
        raise BuildError(f"cannot create {out_dir}: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename else "")) from None


@contextmanager
def staged(out_dir: Path, check: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Write an output into the yielded temporary directory beside `out_dir`. When the block succeeds, `check`
    runs again (the directory may have changed while we wrote; its notice, e.g. "replacing the build in ...",
    goes to stderr) and the result replaces `out_dir`; when it fails in any way, the temporary is removed
    and `out_dir` is as it was."""
    tmp = staging_dir(out_dir)
    try:
        yield tmp
        notice = check(Path(out_dir)) if check else None
        if notice:
            print(f"l4compile: {notice}", file=sys.stderr)
        replace_dir(tmp, Path(out_dir))   # the path `check` saw
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: `path` is the old file or the
    new one at every moment, never a half-written one (the temporary has mkdtemp's 0600: widened like a
    file open() makes)."""
    path = Path(path)
    check_named(path)
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.absolute().parent)
    except OSError as exc:
        raise BuildError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_named(out_dir: Path) -> None:
    """The output must end in a name: `.`, `..` and `/` name no entry that the swap could rename (and checking
    `x/..` while x is absent, then swapping once it exists, would check one directory and replace another)."""
    if Path(out_dir).name in ("", ".", ".."):
        raise BuildError(f"{out_dir}: the output must end in a name (not ., .. or /); choose another -o")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def require_space(directory: Path, needed: int, what: str = "weights") -> None:
    """Refuse before writing when the file system of `directory` has less than `needed` bytes free."""
    from l4compile.inspect import format_bytes
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise BuildError(f"the build needs {format_bytes(needed)} for {what} but {Path(directory).parent} has only "
                         f"{format_bytes(free)} free")


def remove_stale(parent: Path) -> list[str]:
    """Remove `.NAME.tmp-PID-*` directories of processes that are gone; put back a `.NAME.old-PID-*`
    left by a build killed between the two renames of a non-atomic swap. Returns what it removed."""
    removed = []
    for entry in list(parent.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink() or _alive(int(match["pid"] or match["old"])):
            continue
        final = parent / match["name"]
        if match["old"] and not final.exists():
            os.replace(entry, final)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True   # another user's process (or a number we cannot ask about): leave it alone
    return True


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` into place. An existing `target` is exchanged with it atomically where the OS can
    (Linux renameat2), else renamed aside first; the old content is removed only once the new is there."""
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    if target.is_dir() and not target.is_symlink() and _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)   # `new` now holds the old build
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-0")
    os.replace(target, old)
    os.replace(new, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = _libc_renameat2()
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return result == 0


_RENAMEAT2 = []


def _libc_renameat2():
    if not _RENAMEAT2:
        function = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            function = libc.renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _RENAMEAT2.append(function)
    return _RENAMEAT2[0]
