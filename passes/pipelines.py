"""Passes by name, and pipelines: named lists of (pass, options), declared here per target or in a YAML file.

A pipeline file lists passes by name, each optionally with its options:

    name: my-pipeline            # optional; defaults to the file name
    kv_layout: in-place          # optional: the KV cache the lowering builds for (default sequence-major)
    passes:
      - constant-fold
      - moe-dispatch: {impl: gather}
      - chunked-attention
      - cse
      - dce
    late:                        # optional: passes that run after those a build appends (--quantize, --tp)
      - fuse-gate-up
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from l4compile.errors import PassError
from l4compile.passes.base import Pass
from l4compile.passes.attention_lengths import AttentionLengths
from l4compile.passes.chunked_attention import ChunkedAttention, GlobalAttentionBlocks
from l4compile.passes.cleanup import CommonSubexpressionElimination, ConstantFolding, DeadCodeElimination
from l4compile.passes.flat_heads import FlatHeads
from l4compile.passes.fuse_gate_up import FuseGateUp
from l4compile.passes.moe_dispatch import MoEDispatch
from l4compile.passes.quantize import QuantizeFP8, QuantizeINT4, QuantizeINT8
from l4compile.passes.quantize_activations import QuantizeActivationsFP8
from l4compile.passes.rotary_embedding import RotaryEmbedding
from l4compile.passes.shard import Shard
from l4compile.passes.skip_rms_norm import SkipRMSNorm

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (
    ConstantFolding, MoEDispatch, ChunkedAttention, GlobalAttentionBlocks, RotaryEmbedding, SkipRMSNorm, FlatHeads,
    AttentionLengths, FuseGateUp, CommonSubexpressionElimination, DeadCodeElimination,
    QuantizeFP8, QuantizeINT4, QuantizeINT8, QuantizeActivationsFP8, Shard,
)}


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    passes: tuple[tuple[str, dict[str, Any]], ...]
    # The KV cache the graph is lowered for (l4compile.lower.KV_LAYOUTS): "in-place" (attention over
    # per-row cache buffers, onnxruntime's GroupQueryAttention) or "sequence-major" (standard ONNX ops).
    kv_layout: str = "sequence-major"
    # Passes that run after those a build appends (quantization, sharding): they rewrite what those produce.
    late: tuple[tuple[str, dict[str, Any]], ...] = ()

    def instantiate(self, disable: Iterable[str] = (), late: bool = False) -> list[Pass]:
        """The passes (with `late`, the late ones) less those named in `disable`."""
        off = set(disable)
        return [make_pass(name, options) for name, options in (self.late if late else self.passes) if name not in off]


PIPELINES: dict[str, Pipeline] = {p.name: p for p in (
    Pipeline("none", "the straight lowering, for debugging", ()),
    Pipeline("onnx-cpu", "onnxruntime on CPU: MoE through onnxruntime's MoE op (experts in 4 parts, so that its "
             "threads share a decode token's expert), attention over in-place per-row KV "
             "caches (GroupQueryAttention; chunked layers hold one chunk, q/k/v flat, lengths once per layer "
             "kind), RotaryEmbedding; after quantization, a SwiGLU MLP's gate and up as one matmul",
             (("constant-fold", {}), ("moe-dispatch", {"impl": "ort", "ort_parts": 4}), ("chunked-attention", {}),
              ("global-attention-blocks", {}), ("rotary-embedding", {}), ("flat-heads", {}), ("attention-lengths", {}),
              ("cse", {}), ("dce", {})),
             kv_layout="in-place", late=(("fuse-gate-up", {}),)),
    Pipeline("trt", "standard ONNX ops only (what TensorRT parses): grouped MoE dispatch, chunked layers blockwise",
             (("constant-fold", {}), ("moe-dispatch", {"impl": "grouped"}), ("chunked-attention", {}), ("cse", {}),
              ("dce", {}))),
)}
DEFAULT_PIPELINE = {"onnx": "onnx-cpu", "trt": "trt", "ort-genai": "onnx-cpu"}


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_pass_name(name: str, what: str = "pass") -> None:
    if name not in PASSES:
        raise PassError(f"unknown {what} {name!r}{_did_you_mean(name, PASSES)}; known passes: "
                        f"{', '.join(PASSES)}")


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """A pass by name with its options, checked against the pass's declared options."""
    check_pass_name(name)
    cls = PASSES[name]
    declared = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in (options or {}).items():
        if key not in declared:
            known = ", ".join(declared) or "none"
            raise PassError(f"pass {name} has no option {key!r}{_did_you_mean(key, declared)}; options: {known}")
        default = declared[key].default
        if default is not dataclasses.MISSING and not isinstance(value, type(default)):
            raise PassError(f"pass {name}: option {key} must be {type(default).__name__}, got {value!r}")
    return cls(**(options or {}))


def load_pipeline(ref: str) -> Pipeline:
    """A named pipeline, or a pipeline YAML file (a path ending in .yaml or .yml)."""
    if ref in PIPELINES:
        return PIPELINES[ref]
    if ref.endswith((".yaml", ".yml")):
        return _read_pipeline_file(Path(ref))
    raise PassError(f"unknown pipeline {ref!r}{_did_you_mean(ref, PIPELINES)}; known: {', '.join(PIPELINES)}, "
                    f"or a pipeline .yaml file")


def pipeline(ref: str, disable: Iterable[str] = ()) -> list[Pass]:
    """The passes of a named pipeline or pipeline file, without those named in `disable`."""
    disable = list(disable)
    for name in disable:
        check_pass_name(name, "pass to disable")
    return load_pipeline(ref).instantiate(disable)


def _read_pipeline_file(path: Path) -> Pipeline:
    if not path.is_file():
        raise PassError(f"pipeline file {path} does not exist")
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PassError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML: {getattr(exc, 'problem', exc)}") \
            from None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise PassError(f"{path}: expected a mapping with a 'passes' list")
    unknown = set(data) - {"name", "description", "passes", "kv_layout", "late"}
    if unknown:
        raise PassError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected name, description, kv_layout, passes, "
                        "late")
    layouts = ("sequence-major", "in-place")   # l4compile.lower.KV_LAYOUTS
    kv_layout = data.get("kv_layout", "sequence-major")
    if kv_layout not in layouts:
        raise PassError(f"{path}: kv_layout must be one of {', '.join(layouts)}, got {kv_layout!r}")
    passes = _entries(path, root, data, "passes")
    late = _entries(path, root, data, "late") if "late" in data else ()
    return Pipeline(str(data.get("name", path.stem)), str(data.get("description", f"from {path}")), passes,
                    kv_layout, late)


def _entries(path: Path, root: Any, data: dict, key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """A pipeline file's list `key` (passes, late): pass names, each optionally with its options."""
    if not isinstance(data[key], list):
        raise PassError(f"{path}: '{key}' must be a list of passes")
    lines = _entry_lines(root, key)
    entries = []
    for i, entry in enumerate(data[key]):
        where = f"{path}:{lines[i] if i < len(lines) else '?'}: {key}[{i}]"
        if isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            options = options or {}
        else:
            name, options = entry, {}
        if not isinstance(name, str) or not isinstance(options, dict):
            raise PassError(f"{where}: expected a pass name or 'name: {{option: value}}', found {entry!r}")
        try:
            make_pass(name, options)
        except PassError as exc:
            raise PassError(f"{where}: {exc}") from None
        entries.append((name, dict(options)))
    return tuple(entries)


def _entry_lines(root: Any, key: str = "passes") -> list[int]:
    for k, value in getattr(root, "value", []):
        if getattr(k, "value", None) == key and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def run_pipeline(graph: Any, ref: str, disable: Iterable[str] = (), verify_each: bool = True,
                 verbose: bool = False, print_ir_after: str | None = None,
                 log: Callable[[str], None] = print, extra: Iterable[Pass] = (),
                 show_ir: Callable[[str], None] | None = None) -> tuple[str, list]:
    """Run a pipeline on `graph`: -v logs each pass's time and stats, print_ir_after the IR after that pass
    (through `show_ir`, default `log`). `extra` passes run after the pipeline's own (build --quantize
    appends its passes there). The run is the "passes" phase of the current progress reporter.

    Returns the pipeline's label (its name, with any disabled passes and extra ones) and the per-pass results.
    """
    from l4compile.ir.printer import print_ir
    from l4compile.passes.base import PassManager, format_result
    from l4compile.progress import current
    show_ir = show_ir or log
    declared = load_pipeline(ref)
    extra = list(extra)
    passes = pipeline(ref, disable) + extra + declared.instantiate(disable, late=True)
    if print_ir_after is not None:
        check_pass_name(print_ir_after, "pass for --print-ir-after")
        if not any(p.name == print_ir_after for p in passes):
            raise PassError(f"--print-ir-after {print_ir_after}: that pass does not run in pipeline {declared.name}")

    def after(p: Pass, g: Any, result: Any) -> None:
        task.advance(item=p.name)
        if verbose:
            log(format_result(p.name, result))
        if p.name == print_ir_after:
            show_ir(f"// IR after {p}\n{print_ir(g)}")

    if verbose:
        log(f"pipeline {declared.name}: {', '.join(str(p) for p in passes) or '(no passes)'}")
    with current().phase("passes", total=len(passes), unit="pass") as task:
        results = PassManager(passes, verify_each=verify_each, after_pass=after).run(graph)
    off = [name for name, _ in declared.passes + declared.late if name in set(disable)]
    label = declared.name + (f" (without {', '.join(dict.fromkeys(off))})" if off else "")
    label += "".join(f" + {p.name}" for p in extra)
    return label, results


def describe() -> str:
    """`l4compile passes`: every pass with its options and contract, then the named pipelines."""
    lines = ["passes:"]
    w = max(map(len, list(PASSES) + list(PIPELINES))) + 1
    for name, cls in PASSES.items():
        lines.append(f"  {name:<{w}} {cls.description}")
        options = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        if options:
            lines.append(f"  {'':<{w}} options: {options}")
        contract = [f"{key}: {', '.join(values)}" for key, values in (("requires", cls.requires),
                                                                       ("ensures", cls.ensures)) if values]
        if contract:
            lines.append(f"  {'':<{w}} {'; '.join(contract)}")
    lines.append("pipelines:")
    for name, p in PIPELINES.items():
        targets = [t for t, default in DEFAULT_PIPELINE.items() if default == name]
        default = f" (default for --target {', '.join(targets)})" if targets else ""
        lines.append(f"  {name:<{w}} {p.description}{default}")
        lines.append(f"  {'':<{w}} {', '.join(str(make_pass(n, o)) for n, o in p.passes) or '(no passes)'}")
        if p.late:
            lines.append(f"  {'':<{w}} then, after the passes a build appends: "
                         f"{', '.join(str(make_pass(n, o)) for n, o in p.late)}")
    lines.append("or --pipeline FILE.yaml: a list of passes with options (see passes/pipelines.py)")
    return "\n".join(lines)
