"""TensorRT engine building through the TensorRT 10 Python API; `tensorrt` is imported only here, lazily.

network from the ONNX parser (parse_from_file, so external weights are found next to the
model) -> builder config (precision flags, one optimization profile per runtime phase,
timing cache) -> build_serialized_network -> engine file written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from l4compile.errors import BuildError
from l4compile.progress import Progress, Task, current
from l4compile.trt.profiles import Profile

INSTALL_HINT = "pip install -e '.[trt]' on a host with an NVIDIA GPU"


def import_tensorrt() -> Any:
    import tensorrt
    return tensorrt


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart   # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart                        # older cuda-python
    return cudart


def unavailable_reason() -> str | None:
    """Why no engine can be built here (None when tensorrt imports and a CUDA GPU is visible)."""
    try:
        import_tensorrt()
    except ImportError:
        return "tensorrt is not installed"
    except Exception as exc:  # a broken install (missing libnvinfer, CUDA driver mismatch) fails at import
        return f"tensorrt failed to import ({type(exc).__name__}: {exc})"
    try:
        cudart = _import_cudart()
    except ImportError:
        return "cuda-python is not installed (the TensorRT runtime uses it for device memory)"
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:
        return f"the CUDA runtime is not usable ({exc})"
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return "no CUDA GPU is visible"
    return None


def write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or a buffer) to `path` through a temporary file in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(memoryview(data))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def parser_error(parser: Any) -> str:
    """One line from the ONNX parser's errors: the first, naming its node and operator where it can."""
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if not errors:
        return "TensorRT's ONNX parser rejected the model without an error message"
    first = errors[0]
    where = ""
    if hasattr(first, "node_name") and first.node_name():
        where = f"node {first.node_name()!r} ({first.node_operator()}): "
    desc = first.desc() if hasattr(first, "desc") else str(first)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"TensorRT's ONNX parser rejected the model: {where}{desc}{more}"


def add_profile(builder: Any, network: Any, config: Any, profile: Profile) -> None:
    """Every network input gets a range: dimensions for tensors, values for shape tensors."""
    trt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            if tensor.name not in profile.values:
                raise BuildError(f"TensorRT treats input {tensor.name} as a shape tensor, but the {profile.name} "
                                 "profile has no value range for it")
            low, opt, high = profile.values[tensor.name]
            trt_profile.set_shape_input(tensor.name, [low], [opt], [high])
        elif tensor.name in profile.shapes:
            trt_profile.set_shape(tensor.name, *profile.shapes[tensor.name])
        elif any(d < 0 for d in tensor.shape):
            raise BuildError(f"input {tensor.name} has dynamic shape {tuple(tensor.shape)} but no range in the "
                             f"{profile.name} profile")
    config.add_optimization_profile(trt_profile)


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], flags: tuple[str, ...],
                 timing_cache: Path | None, log: Callable[[str], None] | None = None,
                 cleared: tuple[str, ...] = ()) -> str:
    """Build and write the engine with these BuilderFlag names set (and `cleared` ones unset);
    returns the TensorRT version that built it. The build is the "engine" phase of the progress
    reporter, TensorRT's own phases nested in it; `log` (default: the reporter's notes) says what
    is being built."""
    progress = current()
    log = log or progress.note
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(parser_error(parser))
    config = builder.create_builder_config()
    if has_collectives(onnx_path):   # a rank of a sharded build: in-engine NCCL collectives
        # A preview feature in TensorRT 10.16 (the name says so), generally available from 11.0 on.
        multi_device = getattr(getattr(trt, "PreviewFeature", None), "MULTIDEVICE_RUNTIME_10_16", None)
        if multi_device is not None:
            config.set_preview_feature(multi_device, True)
    for flag in flags:
        if not hasattr(trt.BuilderFlag, flag):
            raise BuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}, which this model needs")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in cleared:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    for profile in profiles:
        add_profile(builder, network, config, profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    log(f"building TensorRT {trt.__version__} engine (flags {', '.join(flags) or 'none'}, {len(profiles)} profiles"
        f"{', timing cache ' + str(timing_cache) if timing_cache else ''})")
    with progress.phase("engine"):
        if hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = _phase_monitor(trt, progress)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT could not build the engine (its log above says why)")
    write_atomic(engine_path, serialized)
    if timing_cache:
        write_atomic(Path(timing_cache), config.get_timing_cache().serialize())
    return str(trt.__version__)


def has_collectives(onnx_path: Path) -> bool:
    """Whether the model holds DistCollective nodes (reads the graph, not its external weights)."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type == "DistCollective" for node in model.graph.node)


def _phase_monitor(trt: Any, progress: Progress) -> Any:
    class PhaseMonitor(trt.IProgressMonitor):
        """TensorRT's phases as nested progress phases (their end lines with -v only)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, Task] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = progress.phase(phase_name, total=num_steps, unit="step", summary=False)

        def step_complete(self, phase_name, step):
            task = self.phases.get(phase_name)
            if task is not None:
                task.advance(max(step - task.count, 0))
            return True   # False would cancel the build

        def phase_finish(self, phase_name):
            task = self.phases.pop(phase_name, None)
            if task is not None:
                task.finish()
    return PhaseMonitor()
