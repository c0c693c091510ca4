"""`build --tp N`: one folder per rank, each with its own graph, weights file, segments and (TensorRT) engine.

    OUT/manifest.json            the model as a whole: KV layout of all ranks side by side, `sharding`
    OUT/rank_R/model.onnx        rank R's graph with DistCollective nodes (what TensorRT builds)
    OUT/rank_R/model.onnx.data   rank R's weights only, streamed from the checkpoint slice by slice
    OUT/rank_R/segment_KK.onnx   the same graph cut at its collectives (onnxruntime; same data file)
    OUT/rank_R/manifest.json     rank R's own manifest (its inputs, KV heads, engine status)
    OUT/rank_0/vision.onnx       a spec with a vision tower: the whole vision encoder, on rank 0 only
                                 (+ vision.onnx.data); every rank's text graph reads its image features

The runtime's host-side reducer (runtime/sharded_backend.py) runs the segments of all ranks in one
process and sums at each cut; on GPUs, each rank's engine runs on its own device with NCCL.

The vision encoder is small next to the text model (Scout's and Maverick's: 0.87 B parameters, 1.7 GB in
bf16) and runs once per image, so it is neither split nor replicated: rank 0 holds it, encodes each
prompt's images once, and the features (replicated, like the embeddings they replace) go to every rank.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from l4compile.build import (DATA_FILE, MODEL_FILE, VISION_DATA_FILE, VISION_FILE, BuildOptions, BuildReport,
                             _manifest, _metadata, compile_graph, emit_vision, resolve_calibration, sparse_stand_in)
from l4compile.emit.onnx_emitter import emit_onnx
from l4compile.errors import BuildError
from l4compile.ir.graph import Graph
from l4compile.ir.ops_collective import DIST_COLLECTIVE
from l4compile.lower_vision import has_image_input
from l4compile.outdir import check_replaceable, require_space, staged
from l4compile.progress import Task, current
from l4compile.runtime import integrity
from l4compile.runtime.manifest import Manifest
from l4compile.shard.plan import VISION_RANK, ShardPlan, local_kv_heads, plan
from l4compile.shard.segments import bind_external_data, split_at_collectives
from l4compile.spec.model import ModelSpec
from l4compile.weights.base import WeightSource

RANK_DIR = "rank_{rank}"
SEGMENT_FILE = "segment_{k:02d}.onnx"
MIN_TENSORRT = "10.16"   # IDistCollectiveLayer, imported by the ONNX parser as DistCollective


def check_options(options: BuildOptions) -> None:
    if options.tp < 2:
        raise BuildError(f"--tp {options.tp}: a sharded build needs at least 2 ranks")
    if options.target != "trt":
        raise BuildError(f"--tp {options.tp} builds per-rank TensorRT graphs: use --target trt (the CPU check of the "
                         "split runs the same graphs on onnxruntime)")
    if (options.quantization() or {}).get("activations"):
        raise BuildError(f"--tp {options.tp} --quantize fp8: calibrated activation scales are not supported across "
                         "ranks yet (calibration runs one rank's graph); add --no-quantize-activations "
                         "(weights in fp8, activations in the build dtype)")
    if options.quantize == "int4" and options.int4_method == "gptq":
        raise BuildError("--tp with --int4-method gptq is not supported (Hessians are per unsharded tensor); "
                         "use --int4-method rtn")


def rank_graphs(spec: ModelSpec, options: BuildOptions, log: Callable[[str], None] = print,
                weights: WeightSource | None = None) -> list[Graph]:
    """Each rank's compiled graph; each a progress phase (with its own lower and passes phases)."""
    graphs = []
    for rank in range(options.tp):
        with current().phase(f"compile rank {rank}"):
            graphs.append(compile_graph(spec, options, log if rank == 0 else (lambda *_: None), weights, rank)[0])
    return graphs


def shard_plan(spec: ModelSpec, options: BuildOptions, graphs: list[Graph], gpu_memory: int | None) -> ShardPlan:
    from l4compile.lower import lower
    from l4compile.trt.profiles import DEFAULT_MAX_SEQ
    engine = options.engine
    max_batch = (engine.max_batch if engine and engine.max_batch else 1)
    max_seq = (engine.max_seq if engine and engine.max_seq else min(spec.max_position_embeddings, DEFAULT_MAX_SEQ))
    unsharded = compile_graph(spec, dataclasses.replace(options, tp=1, verify=False), lambda *_: None)[0] \
        if options.quantize else lower(spec, options.dtype)
    return plan(spec, graphs, unsharded, options.dtype, max_batch, max_seq, gpu_memory)


def check_onnx(path: Path) -> None:
    """onnx.checker on the rank's model, with its collectives read as Identity (the checker knows no
    DistCollective; it has one input and one output of the same type, as Identity does)."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == DIST_COLLECTIVE:
            node.op_type = "Identity"
            del node.attribute[:]
    probe = path.with_name(f".{path.stem}.check.onnx")
    try:
        onnx.save_model(model, probe)
        onnx.checker.check_model(str(probe), full_check=True)
    finally:
        probe.unlink(missing_ok=True)


def write_rank(graph: Graph, rank_dir: Path, weights: WeightSource | None, metadata: dict[str, str],
               progress: Task | None = None, segments: bool = True) -> tuple[int, int, list[list[tuple[str, str]]]]:
    """Model, weights (none for a dry run: a sparse file of the real size) and segments of one rank.
    `progress` advances per tensor written. Returns (weight bytes, largest tensor bytes, the reductions
    after each segment)."""
    rank_dir.mkdir(parents=True, exist_ok=True)
    artifact = emit_onnx(graph, rank_dir, weights, DATA_FILE, metadata, progress)
    if weights is None:
        sparse_stand_in(rank_dir / DATA_FILE, artifact.weight_bytes)
    onnx.save_model(artifact.model, rank_dir / MODEL_FILE)
    check_onnx(rank_dir / MODEL_FILE)
    reductions = []
    for k, segment in enumerate(split_at_collectives(graph) if segments else []):
        model = emit_onnx(segment.graph, None, None, DATA_FILE, metadata, logits_first=False).model
        bind_external_data(model, artifact.model)
        onnx.save_model(model, rank_dir / SEGMENT_FILE.format(k=k))
        reductions.append([list(pair) for pair in segment.reductions])
    return artifact.weight_bytes, artifact.largest_tensor_bytes, reductions


def manifests(spec: ModelSpec, graphs: list[Graph], options: BuildOptions, weights: str,
              reductions: list) -> tuple[Manifest, list[Manifest]]:
    """The top-level manifest (all ranks' KV heads side by side, rank-major) and each rank's own."""
    tp, local = options.tp, local_kv_heads(spec, options.tp)
    ranks = []
    for rank, graph in enumerate(graphs):
        m = _manifest(spec, graph, options, weights)
        layers = [dataclasses.replace(layer, num_kv_heads=local) for layer in m.layers]
        vision = m.vision if m.vision is None or rank == VISION_RANK else \
            {**m.vision, "files": None, "rank": VISION_RANK}   # features come from rank 0's encoder
        ranks.append(dataclasses.replace(m, layers=layers, sharding={"tp": tp, "rank": rank}, vision=vision))
    top = ranks[0]
    if top.vision is not None:
        top = dataclasses.replace(top, vision=top_level_vision(top.vision, RANK_DIR.format(rank=VISION_RANK)))
    files = {}
    for rank in range(tp):
        folder = RANK_DIR.format(rank=rank)
        files.update({f"{folder}.model": f"{folder}/{MODEL_FILE}", f"{folder}.weights": f"{folder}/{DATA_FILE}"})
    sharding = {"tp": tp, "kv_heads_per_rank": local, "ranks": [RANK_DIR.format(rank=r) for r in range(tp)],
                "segments": [SEGMENT_FILE.format(k=k) for k in range(len(reductions))], "reductions": reductions,
                "collective": DIST_COLLECTIVE, "min_tensorrt": MIN_TENSORRT}
    top = dataclasses.replace(top, files=files, layers=[dataclasses.replace(layer, num_kv_heads=local * tp)
                                                        for layer in top.layers], sharding=sharding)
    return top, ranks


def top_level_vision(vision: dict, folder: str) -> dict:
    """The top-level manifest's `vision`: rank 0's (the encoder's rank), its file names from the top directory."""
    return {**vision, "rank": VISION_RANK, "files": {role: f"{folder}/{name}" for role, name in vision["files"].items()}}


def dry_run_sharded(spec: ModelSpec, options: BuildOptions, gpu_memory: int | None,
                    log: Callable[[str], None] = print) -> tuple[BuildReport, ShardPlan]:
    """Every rank's graph compiled, emitted and checked against a sparse data file; no weights (so no
    calibration either: activation scales are 1, as in an unsharded dry run)."""
    check_options(dataclasses.replace(options, quantize_activations=False))
    options = dataclasses.replace(options, int4_method="rtn") if options.int4_method == "auto" else options
    graphs = rank_graphs(spec, options, log)
    the_plan = shard_plan(spec, options, graphs, gpu_memory)
    files, tensors, largest = {}, 0, 0
    with tempfile.TemporaryDirectory(prefix="l4compile-dry-run-") as tmp:
        for rank, graph in enumerate(graphs):
            folder = RANK_DIR.format(rank=rank)
            with current().phase(f"emit and check rank {rank}"):
                size, big, _ = write_rank(graph, Path(tmp) / folder, None, _metadata(spec, options), segments=False)
                if options.target == "trt":
                    from l4compile.trt.compat import check_file
                    check_file(Path(tmp) / folder / MODEL_FILE).raise_if_incompatible()
            files[f"{folder}/{MODEL_FILE}"] = (Path(tmp) / folder / MODEL_FILE).stat().st_size
            files[f"{folder}/{DATA_FILE}"] = size
            tensors += len(graph.params())
            largest = max(largest, big)
    if has_image_input(spec):
        with current().phase("vision model"):
            vision = emit_vision(spec, options, None, None)
        folder = RANK_DIR.format(rank=VISION_RANK)
        files.update({f"{folder}/{VISION_FILE}": vision.model.ByteSize(), f"{folder}/{VISION_DATA_FILE}":
                      vision.weight_bytes})
        tensors, largest = tensors + vision.tensors, max(largest, vision.largest_tensor_bytes)
    return BuildReport(None, files, tensors, largest, [], dry_run=True, quantization=options.quantization()), the_plan


def build_sharded(spec: ModelSpec, out_dir: Path, weights: WeightSource, options: BuildOptions,
                  gpu_memory: int | None, log: Callable[[str], None] = print) -> BuildReport:
    """Write a complete sharded build directory, or nothing (temp dir, then rename). `log` gets the IR
    --print-ir asks for; progress and warnings go to the progress reporter."""
    check_options(options)
    out_dir = Path(out_dir)
    progress = current()
    options = resolve_calibration(spec, options, progress.warn)
    check_replaceable(out_dir, options.force)
    graphs = rank_graphs(spec, options, log, weights)
    shard_plan(spec, options, graphs, gpu_memory).raise_if_unfit()
    tensors, largest = 0, 0
    try:
        with staged(out_dir, lambda out: check_replaceable(out, options.force)) as tmp:
            needed = sum(v.type.nbytes() for g in graphs for v in g.params())
            require_space(tmp, needed)
            with progress.phase("write weights", total=sum(len(g.params()) for g in graphs), unit="tensor",
                                size_total=needed, detail=f"({options.tp} ranks)") as task:
                for rank, graph in enumerate(graphs):
                    _, big, reductions = write_rank(graph, tmp / RANK_DIR.format(rank=rank), weights,
                                                    _metadata(spec, options), task)
                    tensors, largest = tensors + len(graph.params()), max(largest, big)
            if has_image_input(spec):
                with progress.phase("vision model"):
                    vision = emit_vision(spec, options, tmp / RANK_DIR.format(rank=VISION_RANK), weights)
                tensors, largest = tensors + vision.tensors, max(largest, vision.largest_tensor_bytes)
            top, ranks = manifests(spec, graphs, options, weights.description, reductions)
            if options.target == "trt":
                top, ranks = _finish_trt(tmp, out_dir, top, ranks, options)
            for rank, manifest in enumerate(ranks):
                manifest.write(tmp / RANK_DIR.format(rank=rank))
            dataclasses.replace(top, checksums=integrity.record(tmp)).write(tmp)
    finally:
        weights.close()
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*")) if p.is_file()
             and (p.parent == out_dir or p.name in (MODEL_FILE, DATA_FILE, VISION_FILE, VISION_DATA_FILE))}
    return BuildReport(out_dir, files, tensors, largest, [], quantization=options.quantization())


def _finish_trt(tmp: Path, out_dir: Path, top: Manifest, ranks: list[Manifest],
                options: BuildOptions) -> tuple[Manifest, list[Manifest]]:
    """Each rank: compat report, then its engine (multi-device) or, without TensorRT, one warning for all ranks."""
    log = current().warn
    from l4compile.trt.profiles import EngineOptions
    from l4compile.trt.target import finish_build
    done = []
    for rank, manifest in enumerate(ranks):
        folder = RANK_DIR.format(rank=rank)
        quiet = (lambda *_: None) if rank else (lambda line: log(line.replace(str(out_dir / folder), str(out_dir))))
        with current().phase(f"TensorRT rank {rank}"):   # its compat check and engine, nested
            done.append(finish_build(tmp / folder, out_dir / folder, manifest, options.engine or EngineOptions(),
                                     quiet))
    backend = "tensorrt" if all(m.backend == "tensorrt" for m in done) else "onnxruntime"
    vision = top_level_vision(done[VISION_RANK].vision, RANK_DIR.format(rank=VISION_RANK)) if top.vision else None
    return dataclasses.replace(top, backend=backend, trt=done[0].trt, vision=vision), done
