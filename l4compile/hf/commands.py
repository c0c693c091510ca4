"""The `import-hf` and `export-hf` subcommands (registered by l4compile.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from l4compile.errors import BuildError, WeightError

SPEC_HEADER = "# Written by `l4compile import-hf` from {config}.\n"


def cmd_import_hf(args: argparse.Namespace) -> int:
    from l4compile.hf.config import load_hf_config, spec_from_hf_config
    from l4compile.spec import dump_spec_yaml
    config, file = load_hf_config(args.checkpoint)
    name = args.name or (file.parent.resolve().name or "imported")
    if not name.strip() or not name.isprintable() or any("\ud800" <= c <= "\udfff" for c in name):
        # (a command-line byte that is not UTF-8 arrives as a lone surrogate, which the spec loader refuses)
        raise BuildError(f"--name {name!r}: expected printable Unicode text (a spec name)")
    text = SPEC_HEADER.format(config=file) + dump_spec_yaml(spec_from_hf_config(config, name, str(file)))
    if args.output is None:
        print(text, end="")
        return 0
    out = Path(args.output)
    if out.is_dir():
        raise BuildError(f"{out} is a directory; -o takes the spec file to write (e.g. {out / (name + '.yaml')})")
    notice = _check_spec_replaceable(out, args.force)
    if notice:
        print(f"l4compile: {notice}", file=sys.stderr)
    from l4compile.outdir import replace_file
    replace_file(out, text)
    print(f"wrote spec {name} -> {out}")
    return 0


def _check_spec_replaceable(out: Path, force: bool) -> str | None:
    """An existing -o file is replaced only when import-hf wrote it (its first line says so), or with --force: it
    may be a spec the user wrote by hand. Returns the notice of a replacement."""
    if not out.exists() and not out.is_symlink():
        return None
    try:
        with open(out, "rb") as f:
            ours = f.readline(200).startswith(SPEC_HEADER.split("{")[0].encode())
    except OSError:
        ours = False
    if ours and not out.is_symlink():
        return f"replacing the spec import-hf wrote at {out}"
    if force:
        return f"replacing {out} (--force)"
    raise BuildError(f"{out} exists and is not a spec import-hf wrote; refusing to overwrite it (choose another -o, "
                     "or pass --force)")


def cmd_export_hf(args: argparse.Namespace) -> int:
    from l4compile.hf.export import export_from_build, export_from_run, export_state_dict, is_training_run
    from l4compile.progress import current
    progress = current()
    source, out = Path(args.source), Path(args.output)
    if is_training_run(source):
        if args.spec:
            raise BuildError("--spec is for a state_dict file; a training run carries its own spec")
        report = export_from_run(source, out, args.dtype, args.max_shard_size)
    elif (source / "manifest.json").is_file():
        if args.spec:
            raise BuildError("--spec is for a state_dict file; a build directory carries its own spec")
        report = export_from_build(source, out, args.dtype, args.max_shard_size)
    elif source.is_file():
        if not args.spec:
            raise BuildError(f"{source}: a state_dict file needs --spec SPEC (the spec it was trained with)")
        from l4compile.spec import load_spec
        with progress.phase("load spec"):
            spec = load_spec(args.spec)
        with progress.phase("load state_dict"):
            state_dict = _load_state_dict(source)
        report = export_state_dict(state_dict, spec, out, args.dtype or "float32", args.max_shard_size)
    else:
        raise BuildError(f"{source}: expected a build directory, a training run (l4compile train -o RUN) or a "
                         "torch state_dict file")
    if args.json:
        print(json.dumps({"command": "export-hf", "source": str(source), "output": str(out),
                          "tensors": report.tensors, "files": report.files,
                          "total_bytes": sum(report.files.values()), **progress.report()}, indent=2))
        return 0
    print(f"exported {report.tensors} tensors -> {out}")
    for name, size in report.files.items():
        print(f"  {name:<40} {size:>14,d} B")
    return 0


def _load_state_dict(path: Path) -> dict:
    """A GraphModule state_dict saved with torch.save (or a dict holding it under 'state_dict')."""
    try:
        import torch
    except ImportError:
        raise BuildError("exporting a state_dict file needs torch: pip install 'l4compile[torch]'") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise WeightError(f"{path}: not a torch state_dict ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise WeightError(f"{path}: expected a state_dict (a dict of tensors), found {type(data).__name__}")
    return data


def add_hf_commands(sub: argparse._SubParsersAction, size_type: Callable[[str], int]) -> None:
    """Register import-hf and export-hf; `size_type` parses sizes like 5GB."""
    p = sub.add_parser("import-hf", help="write a spec from a Hugging Face checkpoint's config.json")
    p.add_argument("checkpoint", help="checkpoint directory, or its config.json")
    p.add_argument("-o", "--output", help="spec file to write (default: print it)")
    p.add_argument("--name", help="spec name (default: the checkpoint directory's name)")
    p.add_argument("--force", action="store_true", help="overwrite the -o file even if import-hf did not write it")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a Hugging Face checkpoint (config.json + safetensors) "
                                         "from a build directory, a training run or a trained state_dict")
    p.add_argument("source", help="build directory, training run directory (its latest checkpoint) or one of its "
                                  "checkpoints/step-N, or a GraphModule state_dict saved with torch.save")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--spec", help="the spec of a state_dict source")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="tensor dtype (default: the build's, float32 for a training run or a state_dict)")
    p.add_argument("--max-shard-size", type=size_type, default=5 * 10**9,
                   help="largest safetensors shard, e.g. 5GB (default); more shards get an index")
    p.add_argument("--json", action="store_true", help="print one machine-readable report on stdout at the end "
                   "(files, sizes, phase times, warnings)")
    from l4compile.progress import add_progress_args
    add_progress_args(p)
    p.set_defaults(func=cmd_export_hf)
