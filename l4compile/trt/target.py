"""`build --target trt` and `l4compile engine`: compatibility check, report, then an engine or one line why not."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from l4compile.errors import BuildError
from l4compile.progress import current
from l4compile.runtime.manifest import MANIFEST_FILE, Manifest
from l4compile.trt import builder
from l4compile.trt.compat import REPORT_JSON, CompatReport, check_file
from l4compile.trt.profiles import (ENGINE_FILE, TIMING_CACHE_FILE, VISION_ENGINE_FILE, EngineLimits, EngineOptions,
                                    builder_flags, profiles, resolve_limits, vision_limits, vision_profile,
                                    with_engine, with_engine_pending)

VISION_REPORT = "vision_compat"   # vision_compat.json / .txt: the vision model's check against TensorRT's parser


def checked(directory: Path, manifest: Manifest) -> CompatReport:
    """Check the build's ONNX against TensorRT's parser table, write compat.json/.txt, fail on any problem."""
    with current().phase("compat check"):
        report = check_file(Path(directory) / manifest.files["model"])
    report.write(directory)
    report.raise_if_incompatible()
    return report


def finish_build(directory: Path, final_dir: Path, manifest: Manifest, options: EngineOptions,
                 log: Callable[[str], None] | None = None) -> Manifest:
    """The TensorRT part of a build, run in its temporary directory before the rename to `final_dir`.
    Without an engine, one line says why (`log`, default: a warning of the progress reporter)."""
    log = log or current().warn
    report = checked(directory, manifest)
    limits = resolve_limits(manifest, options, tuple(sorted(report.quantized_dq_inputs)))
    reason = builder.unavailable_reason()
    if reason is not None:
        log(f"no TensorRT engine: {reason}; the TensorRT-ready ONNX and {REPORT_JSON} are written; "
            f"build the engine later on a GPU host with TensorRT: l4compile engine {final_dir}")
        return finish_vision(directory, with_engine_pending(manifest, limits, reason), limits, options, reason, log)
    manifest = _build(directory, manifest, limits, options.timing_cache, log)
    return finish_vision(directory, manifest, limits, options, None, log)


def finish_vision(directory: Path, manifest: Manifest, limits: EngineLimits, options: EngineOptions,
                  reason: str | None, log: Callable[[str], None] | None = None) -> Manifest:
    """A vision build's second engine, from vision.onnx: its compat report (vision_compat.json), then the engine
    (vision.plan, one profile of 1..max_tiles tiles) or, where `reason` says there is no TensorRT, pending.
    A manifest without a vision model of its own (text only; ranks > 0 of a sharded build) is returned as is."""
    vision = manifest.vision
    if not vision or not vision.get("files"):
        return manifest
    model = Path(directory) / vision["files"]["model"]
    with current().phase("compat check"):
        report = check_file(model)
    report.write(directory, VISION_REPORT)
    report.raise_if_incompatible()
    precision, max_tiles = vision_limits(vision, limits, options)
    profile = vision_profile(vision, max_tiles)
    flags = builder_flags(precision)
    section = {"precision": precision, "flags": list(flags), "max_tiles": max_tiles, "profiles": [profile.to_dict()],
               "compat_report": f"{VISION_REPORT}.json"}
    files = {role: name for role, name in vision["files"].items() if role != "engine"}
    if reason is not None:
        return dataclasses.replace(manifest, vision={**vision, "files": files, "trt": {
            **section, "status": "pending", "reason": reason, "engine": None, "tensorrt_version": None}})
    version = builder.build_engine(model, Path(directory) / VISION_ENGINE_FILE, [profile], flags,
                                   options.timing_cache or Path(directory) / TIMING_CACHE_FILE, log,
                                   EngineLimits(precision, 1, 1).cleared_flags)
    return dataclasses.replace(manifest, vision={**vision, "files": {**files, "engine": VISION_ENGINE_FILE}, "trt": {
        **section, "status": "built", "reason": None, "engine": VISION_ENGINE_FILE, "tensorrt_version": version}})


def engine_command(directory: Path, options: EngineOptions, log: Callable[[str], None] | None = None) -> Manifest:
    """`l4compile engine DIR`: build the engine of a TensorRT-target build in place, atomically."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    if (manifest.sharding or {}).get("ranks"):   # build --tp N: one multi-device engine per rank
        ranks = []
        for rank, folder in enumerate(manifest.sharding["ranks"]):
            with current().phase(f"TensorRT rank {rank}"):   # its compat check and engine, nested
                ranks.append(engine_command(directory / folder, options, log))
        vision = manifest.vision
        if vision is not None:   # the vision engine is rank 0's (l4compile.shard.build), named from the top
            from l4compile.shard.build import top_level_vision
            vision = top_level_vision(ranks[0].vision, manifest.sharding["ranks"][0])
        manifest = _refresh_checksums(directory, dataclasses.replace(manifest, backend="tensorrt", trt=ranks[0].trt,
                                                                     vision=vision))
        builder.write_atomic(directory / MANIFEST_FILE, (manifest.to_json() + "\n").encode())
        return manifest
    if manifest.target != "trt":
        raise BuildError(f"{directory} was built for target {manifest.target!r}; rebuild it with --target trt "
                         "to get the TensorRT-ready ONNX an engine is built from")
    reason = builder.unavailable_reason()
    if reason is not None:
        raise BuildError(f"cannot build a TensorRT engine here: {reason}; {builder.INSTALL_HINT}, "
                         f"then run: l4compile engine {directory}")
    report = checked(directory, manifest)
    limits = resolve_limits(manifest, options, tuple(sorted(report.quantized_dq_inputs)))
    manifest = _build(directory, manifest, limits, options.timing_cache, log)
    manifest = _refresh_checksums(directory, finish_vision(directory, manifest, limits, options, None, log))
    builder.write_atomic(directory / MANIFEST_FILE, (manifest.to_json() + "\n").encode())
    return manifest


def _refresh_checksums(directory: Path, manifest: Manifest) -> Manifest:
    """The engine command leaves the ONNX models and weights alone (their records are kept, not re-read)
    and writes engines, reports and rank manifests (recorded afresh)."""
    if manifest.checksums is None:
        return manifest
    from l4compile.runtime import integrity
    kept = tuple(name for name in manifest.checksums if name.endswith((".onnx", ".onnx.data")))
    return dataclasses.replace(manifest, checksums=integrity.record(directory, previous=manifest.checksums,
                                                                   keep=kept))


def _build(directory: Path, manifest: Manifest, limits: EngineLimits, timing_cache: Path | None,
           log: Callable[[str], None] | None) -> Manifest:
    built = profiles(manifest, limits)
    version = builder.build_engine(directory / manifest.files["model"], directory / ENGINE_FILE, built,
                                   limits.flags, timing_cache or directory / TIMING_CACHE_FILE, log,
                                   limits.cleared_flags)
    return with_engine(manifest, limits, built, version)
