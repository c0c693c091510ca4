"""`l4compile build`: spec -> IR -> passes -> emitter -> build directory (atomically)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from l4compile import __version__
from l4compile.errors import BuildError
from l4compile.genai import TARGET as GENAI_TARGET, check_options as check_genai_options, \
    text_only as genai_text_only
from l4compile.emit.onnx_emitter import OnnxArtifact, emit_onnx
from l4compile.ir.graph import Graph
from l4compile.ir.printer import print_ir
from l4compile.inspect import build_report, format_bytes
from l4compile.ir.verify import verify
from l4compile.lower import lower
from l4compile.lower_vision import FEATURES, PIXELS, has_image_input, lower_vision, tokens_per_tile
from l4compile.outdir import check_replaceable, require_space, staged
from l4compile.passes.pipelines import DEFAULT_PIPELINE, load_pipeline, run_pipeline
from l4compile.progress import current
from l4compile.quant import TABLE_BITS, TABLE_BLOCK_SIZE, WEIGHT_BLOCK_SIZE
from l4compile.runtime import integrity
from l4compile.runtime.manifest import MANIFEST_FILE, LayerInfo, Manifest, TensorInfo
from l4compile.runtime.preprocess import LLAMA4_IMAGE_TOKENS
from l4compile.spec.model import ModelSpec
from l4compile.weights.base import WeightSource

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
VISION_FILE, VISION_DATA_FILE = "vision.onnx", "vision.onnx.data"   # a spec with a vision tower and image token
# How the runtime finds the cache in the model (see l4compile.lower): cache tensors are
# sequence-major [positions, batch, kv_heads, head_dim]; chunked layers see only their chunk.
KV_CACHE_NAMES = {"layout": ["positions", "batch", "kv_heads", "head_dim"], "past_length": "past_length",
                  "logits_start": "logits_start", "past_key": "past_key.{i}", "past_value": "past_value.{i}",
                  "new_key": "new_key.{i}", "new_value": "new_value.{i}"}
# kv_layout "in-place" (onnx-cpu): per-layer buffers [batch, kv_heads, capacity, head_dim] that the model
# updates in place (present_* bound to past_*'s memory), and a position per row (`past_lengths` [batch]).
KV_CACHE_IN_PLACE = {"layout": ["batch", "kv_heads", "positions", "head_dim"], "in_place": True,
                     "past_length": "past_lengths", "logits_start": "logits_start", "past_key": "past_key.{i}",
                     "past_value": "past_value.{i}", "new_key": "present_key.{i}", "new_value": "present_value.{i}"}
TARGETS = ("onnx", "trt", "ort-genai")
DTYPES = ("float32", "float16", "bfloat16")
# GPTQ's Hessians: 32k tokens, so that each of 16 top-1 experts sees ~2k (bench-16e reaches 0.98 cosine
# with these, 0.979 with half as many).
GPTQ_CALIBRATION = {"batches": 64, "batch_size": 4, "seq_len": 128}


@dataclass
class BuildOptions:
    target: str = "onnx"
    dtype: str = "float32"
    pipeline: str | None = None          # a named pipeline or a pipeline .yaml file; None: the target's default
    verify: bool = True                  # run the IR verifier after every pass (the final graph is always checked)
    print_ir: bool = False
    disable_passes: tuple[str, ...] = ()
    print_ir_after: str | None = None    # print the IR after this pass
    verbose: bool = False                # log each pass's time and stats
    quantize: str | None = None          # "fp8" | "int8" | "int4": quantization passes appended to the pipeline
    quantize_activations: bool | None = None   # fp8: calibrated Q/DQ on activations too; None: yes for target trt
    quantize_embeddings: bool | None = None    # the embedding table too (int8 / int4: blocks like the matmuls';
                                               # fp8: int8 rows); None: yes for int8 / int4
    quantize_lm_head: bool = True        # int8 / int4: the lm_head too (fp8 always quantizes it)
    lm_head_bits: int | None = None      # int4: the quantized lm_head's bits, 4 or 8; None: TABLE_BITS'
    embedding_bits: int | None = None    # int4: the quantized embedding table's bits, 4 or 8; None: TABLE_BITS'
    block_size: int | None = None        # int8 / int4: weights per scale in the layers; None: WEIGHT_BLOCK_SIZE
    int4_method: str = "auto"            # int4: "gptq" (calibrated error compensation), "rtn" (round to
                                         # nearest), "auto": gptq where calibration fits in memory
    engine: Any = None                   # target trt: l4compile.trt.profiles.EngineOptions (None: defaults)
    tp: int = 1                          # tensor/expert-parallel ranks (l4compile.passes.shard); 1: unsharded
    tokenizer: str | None = None         # a directory with a Hugging Face tokenizer to copy into the build
    force: bool = False                  # replace an existing output even if it is not an l4compile build

    def quantization(self) -> dict | None:
        """What --quantize did, for the manifest and the model's metadata."""
        if self.block_size is not None and self.quantize not in ("int8", "int4"):
            why = " (fp8 scales each output channel)" if self.quantize else ""
            raise BuildError(f"--block-size {self.block_size} needs --quantize int8 or int4{why}")
        if self.quantize is None:
            return None
        activations = self.quantize_activations
        if activations is None:   # TensorRT builds FP8 kernels from explicit Q/DQ on weights *and* activations
            activations = self.target == "trt" and self.quantize == "fp8"
        embeddings = self.quantize_embeddings
        if embeddings is None:   # llama.cpp's Q8_0 / Q4_0 files quantize the table too
            embeddings = self.quantize in ("int8", "int4")
        return {"weights": self.quantize, "activations": "fp8" if activations else None,
                "embeddings": (self.quantize if self.quantize in ("int8", "int4") else "int8") if embeddings else None,
                **({"method": self.int4_method} if self.quantize == "int4" else {}),
                **({"block_size": self.block_size or WEIGHT_BLOCK_SIZE} if self.quantize in ("int8", "int4") else {}),
                **({"lm_head": "kept"} if not self.quantize_lm_head and self.quantize != "fp8" else {}),
                **(self._table_precision("lm_head") if self.quantize_lm_head else {}),
                **(self._table_precision("embedding") if embeddings else {})}

    def _table_precision(self, table: str) -> dict[str, int]:
        """int8 / int4: a quantized table's bits and block size (`TABLE_BITS`, `TABLE_BLOCK_SIZE`)."""
        if self.quantize not in ("int8", "int4"):
            return {}
        bits = getattr(self, f"{table}_bits") or TABLE_BITS[self.quantize][table]
        if self.quantize == "int8" and bits != 8:
            raise BuildError(f"--{table.replace('_', '-')}-bits {bits} needs --quantize int4 (int8 keeps it at 8 bits)")
        return {f"{table}_bits": bits, f"{table}_block_size": TABLE_BLOCK_SIZE[self.quantize][table][bits]}


@dataclass
class BuildReport:
    out_dir: Path | None
    files: dict[str, int]              # file name -> bytes (written, or that a real build would write)
    tensors: int
    largest_tensor_bytes: int
    pass_results: list = field(default_factory=list)
    dry_run: bool = False
    pipeline: str = ""
    quantization: dict | None = None   # BuildOptions.quantization()

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """The build part of `build --json`: files, pipeline, each pass's time and stats, quantization."""
        passes = [{"name": name, "seconds": round(r.seconds, 6), "changed": r.changed, "stats": dict(r.stats),
                   **({"skipped": r.skipped} if r.skipped else {})} for name, r in self.pass_results]
        quantization = None
        if self.quantization is not None:
            quantization = {**self.quantization, "passes": {p["name"]: p["stats"] for p in passes
                                                             if p["name"].startswith("quantize")}}
        return {"output": str(self.out_dir) if self.out_dir is not None else None, "dry_run": self.dry_run,
                "files": dict(self.files), "total_bytes": self.total_bytes, "tensors": self.tensors,
                "largest_tensor_bytes": self.largest_tensor_bytes, "pipeline": self.pipeline, "passes": passes,
                "quantization": quantization}


def compile_graph(spec: ModelSpec, options: BuildOptions, log: Callable[[str], None] = print,
                  weights: WeightSource | None = None, rank: int = 0) -> tuple[Graph, list]:
    """Lower and run the target's pipeline, verifying after each pass. `weights` calibrate
    quantization (without them, as in a dry run, activation scales are 1 and int4 rounds to nearest).
    With options.tp > 1 the shard pass makes the graph rank `rank`'s, before any quantization.
    `log` gets the IR that --print-ir / --print-ir-after ask for; -v's per-pass lines and warnings go
    to the progress reporter (`l4compile.progress.current`)."""
    progress = current()
    if options.dtype not in DTYPES:
        raise BuildError(f"unsupported build dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    if weights is None and options.int4_method == "auto":   # nothing to calibrate with: round to nearest
        options = dataclasses.replace(options, int4_method="rtn")
    options = resolve_calibration(spec, options, progress.warn) if weights is not None else options
    pipeline = options.pipeline or DEFAULT_PIPELINE[options.target]
    # The shard pass splits the sequence-major cache's ops by KV heads; sharded builds keep that layout.
    kv_layout = load_pipeline(pipeline).kv_layout if options.tp == 1 else "sequence-major"
    if options.target == GENAI_TARGET:   # onnxruntime-genai's decoder inputs, whatever the pipeline's passes
        check_genai_options(spec, options.tp, options.dtype)
        kv_layout = "genai"
    with progress.phase("lower"):
        graph = lower(spec, options.dtype, kv_layout=kv_layout)
        verify(graph)
    from l4compile.passes.quantize import quantization_passes
    from l4compile.passes.quantize_activations import UNCALIBRATED
    from l4compile.quant.calibrate import Calibration
    from l4compile.passes.shard import Shard
    extra = ([Shard(options.tp, rank)] if options.tp > 1 else []) + quantization_passes(options.quantization(), options.target,
                                Calibration(weights) if weights is not None else UNCALIBRATED,
                                Calibration(weights, **GPTQ_CALIBRATION).hessians if weights is not None else None)
    name, results = run_pipeline(graph, pipeline, options.disable_passes,
                                 options.verify, options.verbose, options.print_ir_after, progress.note, extra,
                                 show_ir=log)
    if not options.verify:
        verify(graph)
    graph.metadata["l4compile.pipeline"] = name
    if options.print_ir:
        log(print_ir(graph))
    return graph, results


def _manifest(spec: ModelSpec, graph: Graph, options: BuildOptions, weights: str) -> Manifest:
    att = spec.attention
    layers = [LayerInfo(layer.index, layer.attention, att.chunk_size if layer.attention == "chunked" else None,
                        att.num_kv_heads, att.head_dim, att.num_heads) for layer in spec.layers]

    def info(name: str, public: str | None = None) -> TensorInfo:
        t = graph.values[name].type
        return TensorInfo(public or name, t.dtype, list(t.shape))

    return Manifest(
        model_name=spec.name, spec_hash=spec.content_hash(), target=options.target, backend="onnxruntime",
        dtype=options.dtype, pipeline=graph.metadata["l4compile.pipeline"],
        files={"model": MODEL_FILE, "weights": DATA_FILE},
        inputs=[info(v) for v in graph.inputs],
        outputs=[info(graph.outputs[0], "logits")] + [info(v) for v in graph.outputs[1:]],
        vocab_size=spec.vocab_size, max_position_embeddings=spec.max_position_embeddings, layers=layers,
        tokens={"bos": spec.tokens.bos, "eos": list(spec.tokens.eos), "pad": spec.tokens.pad},
        weights=weights, compiler_version=__version__, spec=spec.to_dict(),
        kv_cache=None if options.target == GENAI_TARGET else KV_CACHE_IN_PLACE if "past_lengths" in graph.inputs else
        KV_CACHE_NAMES if "past_length" in graph.inputs else None,
        quantization=options.quantization(),
        vision=_vision_manifest(spec, options) if has_image_input(spec) else None,
    )


def _vision_manifest(spec: ModelSpec, options: BuildOptions) -> dict:
    """How the runtime runs the vision model and fuses its output (manifest field `vision`)."""
    v = spec.vision
    return {"files": {"model": VISION_FILE, "weights": VISION_DATA_FILE}, "dtype": options.dtype,
            "input": PIXELS, "output": FEATURES, "features_input": FEATURES,
            "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
            "tokens_per_tile": tokens_per_tile(v), "hidden_size": spec.hidden_size, "image_token": spec.tokens.image,
            # the prompt's image tokens, where the vocabulary is Llama 4's (else the app names them)
            "prompt_tokens": asdict(LLAMA4_IMAGE_TOKENS) if spec.tokens.image == LLAMA4_IMAGE_TOKENS.patch else None}


def emit_vision(spec: ModelSpec, options: BuildOptions, out_dir: Path | None,
                weights: WeightSource | None) -> OnnxArtifact:
    """The vision model beside the text model: never quantized (it stays in the build dtype), checked like it,
    and against TensorRT's parser table for target trt. Without out_dir (a dry run) nothing is written."""
    graph = lower_vision(spec, options.dtype)
    verify(graph)
    meta = {**_metadata(spec, options), "l4compile.graph": "vision"}
    meta.pop("l4compile.quantization", None)
    if out_dir is not None and weights is not None:
        params = graph.params()
        with current().phase("write weights", total=len(params), unit="tensor",
                             size_total=sum(v.type.nbytes() for v in params)) as task:
            artifact = emit_onnx(graph, out_dir, weights, VISION_DATA_FILE, meta, task, first_output=FEATURES)
    else:
        artifact = emit_onnx(graph, out_dir, None, VISION_DATA_FILE, meta, first_output=FEATURES)
    with tempfile.TemporaryDirectory(prefix="l4compile-vision-") as scratch:
        where = Path(out_dir) if out_dir is not None else Path(scratch)
        if out_dir is None:   # a sparse data file of the real size, as for the text model's dry run
            sparse_stand_in(where / VISION_DATA_FILE, artifact.weight_bytes)
        onnx.save_model(artifact.model, where / VISION_FILE)
        onnx.checker.check_model(str(where / VISION_FILE), full_check=True)
        if options.target == "trt":
            from l4compile.trt.compat import check_file
            check_file(where / VISION_FILE).raise_if_incompatible()
    return artifact


def sparse_stand_in(path: Path, size: int) -> None:
    """A sparse file of `size` bytes (no disk used) for the ONNX checker of a dry run: a file system that
    cannot hold a file that large (ext4: 16 TiB) is one BuildError, as the build itself would meet it."""
    try:
        with open(path, "wb") as sparse:
            sparse.truncate(size)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise BuildError(f"{path.name} would be {format_bytes(size)}, more than a file of {path.parent.parent} "
                             f"can hold ({exc.strerror}); a build needs a file system that holds it") from None
        raise BuildError(f"cannot create the dry run's stand-in {path}: {exc.strerror or exc}") from None


def _metadata(spec: ModelSpec, options: BuildOptions) -> dict[str, str]:
    from l4compile.spec import dump_spec_yaml
    return {"l4compile.version": __version__, "l4compile.spec": dump_spec_yaml(spec),
            "l4compile.spec_name": spec.name, "l4compile.dtype": options.dtype, "l4compile.target": options.target,
            **({"l4compile.quantization": json.dumps(options.quantization())} if options.quantize else {})}


def dry_run(spec: ModelSpec, options: BuildOptions, log: Callable[[str], None] = print) -> BuildReport:
    """Build and check the full graph without materialising a single weight."""
    options = dataclasses.replace(options, int4_method="rtn") if options.int4_method == "auto" else options
    if options.target == GENAI_TARGET:
        spec = genai_text_only(spec, current().warn)
    graph, results = compile_graph(spec, options, log)
    progress = current()
    with progress.phase("emit"):
        artifact = emit_onnx(graph, None, None, DATA_FILE, _metadata(spec, options))
    with tempfile.TemporaryDirectory(prefix="l4compile-dry-run-") as tmp:
        # A sparse data file of the real size: the checker sees exactly what a build writes, no disk is used.
        sparse_stand_in(Path(tmp) / DATA_FILE, artifact.weight_bytes)
        with progress.phase("check"):
            onnx.save_model(artifact.model, Path(tmp) / MODEL_FILE)
            onnx.checker.check_model(str(Path(tmp) / MODEL_FILE), full_check=True)
        if options.target == "trt":
            from l4compile.trt.compat import check_file
            with progress.phase("compat check"):
                check_file(Path(tmp) / MODEL_FILE).raise_if_incompatible()
    manifest_bytes = len(_manifest(spec, graph, options, "(dry run)").to_json()) + 1
    files = {MODEL_FILE: artifact.model.ByteSize(), DATA_FILE: artifact.weight_bytes, MANIFEST_FILE: manifest_bytes}
    if options.target == GENAI_TARGET:
        from l4compile.genai import CONFIG_FILE, genai_config
        files[CONFIG_FILE] = len(json.dumps(genai_config(spec, MODEL_FILE, None), indent=2)) + 1
    tensors, largest = artifact.tensors, artifact.largest_tensor_bytes
    if has_image_input(spec):
        with progress.phase("vision model"):
            vision = emit_vision(spec, options, None, None)
        files.update({VISION_FILE: vision.model.ByteSize(), VISION_DATA_FILE: vision.weight_bytes})
        tensors, largest = tensors + vision.tensors, max(largest, vision.largest_tensor_bytes)
    return BuildReport(None, files, tensors, largest, results, dry_run=True,
                       pipeline=graph.metadata["l4compile.pipeline"], quantization=options.quantization())


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_calibration(spec: ModelSpec, options: BuildOptions, log: Callable[[str], None] = print,
                        memory: int | None = None) -> BuildOptions:
    """Calibration (GPTQ Hessians, fp8 activation ranges) runs the float32 torch reference, which holds
    every weight in memory: allow it where that takes at most a third of this machine's memory."""
    memory = physical_memory() if memory is None else memory
    needed = 4 * build_report(spec)["params_total"]
    fits = needed <= memory // 3
    where = f"calibration holds the float32 model ({format_bytes(needed)}; this machine has {format_bytes(memory)})"
    if options.quantize == "int4" and options.int4_method == "auto":
        options = dataclasses.replace(options, int4_method="gptq" if fits else "rtn")
        if not fits:
            log(f"int4 by round to nearest: GPTQ {where}")
    if not fits and options.quantize == "int4" and options.int4_method == "gptq":
        raise BuildError(f"--int4-method gptq: {where}; use --int4-method rtn")
    if not fits and options.quantize == "fp8" and options.quantization().get("activations"):
        raise BuildError(f"fp8 activation scales: {where}; use --no-quantize-activations")
    return options


def build(spec: ModelSpec, out_dir: Path, weights: WeightSource, options: BuildOptions,
          log: Callable[[str], None] = print) -> BuildReport:
    """Write a complete build directory, or nothing: work in a temp dir, then swap it into place. An
    existing `out_dir` is replaced only if it is an l4compile build (or `options.force`; see outdir.py).
    Each step is a phase of the current progress reporter; `log` gets the IR --print-ir asks for."""
    out_dir = Path(out_dir)
    progress = current()
    options = resolve_calibration(spec, options, progress.warn)
    if options.target not in TARGETS:
        raise BuildError(f"unknown target {options.target!r}; choose one of {', '.join(TARGETS)}")
    if options.target == GENAI_TARGET:
        check_genai_options(spec, options.tp, options.dtype)
        spec = genai_text_only(spec, progress.warn)
    check_replaceable(out_dir, options.force)
    tokenizer_files = None
    if options.tokenizer:
        from l4compile.tokenizer_files import prepare_tokenizer
        tokenizer_files = prepare_tokenizer(options.tokenizer, spec.vocab_size)
    graph, results = compile_graph(spec, options, log, weights)
    try:
        with staged(out_dir, lambda out: check_replaceable(out, options.force)) as tmp:
            params = graph.params()
            require_space(tmp, sum(v.type.nbytes() for v in params))
            with progress.phase("write weights", total=len(params), unit="tensor",
                                size_total=sum(v.type.nbytes() for v in params), detail=_stream_detail(options)) as task:
                artifact = emit_onnx(graph, tmp, weights, DATA_FILE, _metadata(spec, options), task)
            with progress.phase("check"):
                onnx.save_model(artifact.model, tmp / MODEL_FILE)
                onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
            tensors, largest = artifact.tensors, artifact.largest_tensor_bytes
            if has_image_input(spec):
                with progress.phase("vision model"):
                    vision = emit_vision(spec, options, tmp, weights)
                tensors, largest = tensors + vision.tensors, max(largest, vision.largest_tensor_bytes)
            manifest = _manifest(spec, graph, options, weights.description)
            if tokenizer_files:
                from l4compile.tokenizer_files import copy_tokenizer
                files, text = copy_tokenizer(tokenizer_files, tmp)
                manifest = dataclasses.replace(manifest, files={**manifest.files, **files}, text=text)
            if options.target == GENAI_TARGET:
                from l4compile.genai import write_config
                config = write_config(spec, tmp, MODEL_FILE, manifest.text)
                manifest = dataclasses.replace(manifest, files={**manifest.files, "genai_config": config})
            if options.target == "trt":  # compat report, then an engine or one line saying why not
                from l4compile.trt.profiles import EngineOptions
                from l4compile.trt.target import finish_build
                manifest = finish_build(tmp, out_dir, manifest, options.engine or EngineOptions())
            manifest = dataclasses.replace(manifest,
                                           checksums=integrity.record(tmp, {DATA_FILE: artifact.data_sha256}))
            manifest.write(tmp)
    finally:
        weights.close()
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return BuildReport(out_dir, files, tensors, largest, results,
                       pipeline=graph.metadata["l4compile.pipeline"], quantization=options.quantization())


def _stream_detail(options: BuildOptions) -> str:
    """What else happens to each tensor as it is written."""
    quantization = options.quantization()
    if quantization is None:
        return ""
    method = " by GPTQ" if quantization.get("method") == "gptq" else ""
    return f"({quantization['weights']} codes{method} computed as each tensor is written)"
