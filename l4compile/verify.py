"""`l4compile verify BUILD`: every file of a build against the size and sha256 its manifest records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from l4compile.inspect import format_bytes
from l4compile.progress import add_progress_args, current
from l4compile.runtime import integrity
from l4compile.runtime.errors import BuildDirError
from l4compile.runtime.manifest import Manifest


def cmd_verify(args: argparse.Namespace) -> int:
    directory = Path(args.build)
    manifest = Manifest.read(directory)
    rank = (manifest.sharding or {}).get("rank")
    if manifest.checksums is None and rank is not None:   # the top manifest records every rank's files
        raise BuildDirError(f"{directory}: rank {rank} of a sharded build: its files are recorded in the build's "
                            f"top manifest; run: l4compile verify {directory.parent}")
    if manifest.checksums is None:
        integrity.check(directory, None, manifest.files)
        raise BuildDirError(f"{directory}: the manifest records no checksums (built before l4compile recorded "
                            "them; its files are present): rebuild it to make it verifiable")
    total = sum(info["bytes"] for info in manifest.checksums.values())
    with current().phase("checksums", total=len(manifest.checksums), unit="file", size_total=total) as task:
        integrity.check(directory, manifest.checksums, manifest.files, checksums=True,
                        on_bytes=lambda n: task.advance(0, size=n), on_file=lambda name: task.advance(1, item=name))
    if args.json:
        print(json.dumps({"command": "verify", "build": str(directory), "ok": True,
                          "files": {name: info["bytes"] for name, info in manifest.checksums.items()},
                          "total_bytes": total, **current().report()}, indent=2))
        return 0
    print(f"{directory}: {len(manifest.checksums)} files, {format_bytes(total)}, sizes and sha256 checksums "
          "match the manifest")
    return 0


def add_verify_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every file of a build against the sizes and sha256 checksums "
                                      "its manifest records")
    p.add_argument("build", help="build directory")
    p.add_argument("--json", action="store_true", help="print one machine-readable report on stdout at the end "
                   "(files, sizes, phase times); a damaged build is an error as without it")
    add_progress_args(p)
    p.set_defaults(func=cmd_verify)
