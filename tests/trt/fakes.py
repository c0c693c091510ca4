"""Stand-ins for `tensorrt` and cuda-python's runtime, for tests on machines without either.

They record the calls our builder and runtime make and, to run an "engine", execute the build's
ONNX with onnxruntime. Like TensorRT, the fake builder refuses profiles that leave a dynamic input
without a range, and the fake engine keeps to what was built: an execution context accepts only
input shapes (and shape-tensor values) inside its optimization profile, and reports each output's
shape from the dimensions the ONNX declares, resolved from the bound input shapes, with -1 where
they do not determine it (a data-dependent shape); what onnxruntime computes must have that shape.
They check our orchestration (which API calls, in which order, with which shapes, names, pointers
and copies), never TensorRT itself: nothing here says the real parser accepts our ONNX or that a
real engine computes the same logits. The names follow the TensorRT 10 and cuda-python APIs our
code uses; assumptions the fakes make about TensorRT (that it turns `logits_start` into a
host-memory shape tensor and derives the logits' length from its value, and computes an output dimension
like "tiles*4" from the input dimension it multiplies) are marked.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx

SUCCESS = "cudaSuccess"
PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
SHAPE_TENSORS = {"logits_start"}   # assumption: the Slice start that decides the logits' length
# assumption: output dimensions TensorRT computes from input dimensions and shape-tensor values
COMPUTED_DIMS = {"seq-start": lambda dims, values: dims["seq"] - values["logits_start"]}


class Recorder:
    """Everything the fakes were asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, *call) -> None:
        self.calls.append(call)

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


def _declared(value) -> tuple[int | str, ...]:
    """An ONNX value's dimensions: sizes, or symbol names ("" for an unnamed dimension)."""
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim)


def _onnx_io(path: str, which: str) -> list[tuple[str, tuple[int | str, ...], int]]:
    model = onnx.load(path, load_external_data=False)
    return [(v.name, _declared(v), v.type.tensor_type.elem_type) for v in getattr(model.graph, which)]


def _product(dim: str, symbols: dict[str, int]) -> int | None:
    """A declared dimension like "tiles*4" from the input dimensions it multiplies, or None."""
    factors = dim.split("*")
    if len(factors) < 2 or not all(f.isdigit() or f in symbols for f in factors):
        return None
    result = 1
    for f in factors:
        result *= int(f) if f.isdigit() else symbols[f]
    return result


def _static(dims: tuple[int | str, ...]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in dims)


# ---- cuda-python ---------------------------------------------------------------------------
class _Stream:
    def __int__(self) -> int:
        return 0x5EED


def make_cudart(rec: Recorder, devices: int = 1) -> types.ModuleType:
    memory: dict[int, bytearray] = {}
    addresses = itertools.count(1)
    cudart = types.ModuleType("cuda.bindings.runtime")
    cudart.cudaError_t = types.SimpleNamespace(cudaSuccess=SUCCESS)
    cudart.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")
    cudart.memory = memory

    def malloc(n):
        pointer = next(addresses) << 32
        memory[pointer] = bytearray(n)
        rec("cudaMalloc", n)
        return SUCCESS, pointer

    def memcpy(dst, src, n, kind, stream):
        rec("cudaMemcpyAsync", kind, n)
        if kind == "H2D":
            memory[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(memory[src][:n]), n)
        return (SUCCESS,)

    cudart.cudaGetDeviceCount = lambda: (SUCCESS, devices)
    cudart.cudaStreamCreate = lambda: (SUCCESS, _Stream())
    cudart.cudaStreamSynchronize = lambda s: (SUCCESS,)
    cudart.cudaStreamDestroy = lambda s: (SUCCESS,)
    cudart.cudaMalloc = malloc
    cudart.cudaFree = lambda p: (memory.pop(p, None), (SUCCESS,))[1]
    cudart.cudaMemcpyAsync = memcpy
    return cudart


# ---- tensorrt: building ----------------------------------------------------------------------
class _Tensor:
    def __init__(self, name, shape, is_shape_tensor):
        self.name, self.shape, self.is_shape_tensor = name, shape, is_shape_tensor


class _Network:
    def __init__(self):
        self.inputs: list[_Tensor] = []
        self.onnx_path = None

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class _ParserError:
    def __init__(self, node, op, desc):
        self._node, self._op, self._desc = node, op, desc

    def node_name(self):
        return self._node

    def node_operator(self):
        return self._op

    def desc(self):
        return self._desc


class _Parser:
    reject: _ParserError | None = None    # set by a test to make parsing fail

    def __init__(self, network, logger, rec):
        self.network, self.rec, self.errors = network, rec, []

    def parse_from_file(self, path):
        self.rec("parse_from_file", path)
        if _Parser.reject is not None:
            self.errors = [_Parser.reject, _ParserError("", "", "second error")]
            return False
        self.network.onnx_path = path
        self.network.inputs = [_Tensor(n, _static(dims), n in SHAPE_TENSORS) for n, dims, _ in _onnx_io(path, "input")]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _Profile:
    def __init__(self, rec):
        self.rec, self.shapes, self.values = rec, {}, {}

    def set_shape(self, name, low, opt, high):
        assert len(low) == len(opt) == len(high) and all(a <= b <= c for a, b, c in zip(low, opt, high)), \
            (name, low, opt, high)
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    def set_shape_input(self, name, low, opt, high):
        self.values[name] = (list(low), list(opt), list(high))


class _TimingCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return memoryview(b"CACHE:" + bytes(self.data))


class _Config:
    def __init__(self, rec):
        self.rec, self.flags, self.profiles, self.progress_monitor, self.cache = rec, [], [], None, None

    def set_flag(self, flag):
        self.flags.append(flag)

    def clear_flag(self, flag):
        self.flags.append("-" + flag)

    def set_preview_feature(self, feature, enabled):
        self.rec("set_preview_feature", feature, enabled)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        self.rec("create_timing_cache", bytes(data))
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Builder:
    fail = False   # set by a test: build_serialized_network returns None

    def __init__(self, logger, rec):
        self.rec = rec
        self.configs = []

    def create_network(self, flags):
        self.rec("create_network", flags)
        return _Network()

    def create_builder_config(self):
        config = _Config(self.rec)
        self.configs.append(config)
        return config

    def create_optimization_profile(self):
        return _Profile(self.rec)

    def build_serialized_network(self, network, config):
        self.rec("build_serialized_network", tuple(config.flags), [(p.shapes, p.values) for p in config.profiles],
                 config.progress_monitor is not None)
        if config.progress_monitor is not None:   # what TensorRT does with a monitor: phases and steps
            config.progress_monitor.phase_start("Building", None, 2)
            config.progress_monitor.step_complete("Building", 1)
            config.progress_monitor.phase_finish("Building")
        if _Builder.fail or not self._profiles_cover(network, config.profiles):
            return None
        profiles = [{"shapes": p.shapes, "values": p.values} for p in config.profiles]
        plan = {"onnx": network.onnx_path, "profiles": profiles}
        return memoryview(PLAN_MAGIC + json.dumps(plan).encode())

    def _profiles_cover(self, network, profiles) -> bool:
        """TensorRT's rule: each profile gives every dynamic input a range of its rank and every shape
        tensor a range of values (a network with dynamic inputs needs at least one profile)."""
        for tensor in network.inputs:
            if not tensor.is_shape_tensor and -1 not in tensor.shape:
                continue
            for profile in profiles or [_Profile(self.rec)]:
                if tensor.is_shape_tensor:
                    covered = tensor.name in profile.values
                else:
                    covered = len(profile.shapes.get(tensor.name, ((),))[0]) == len(tensor.shape)
                if not covered:
                    self.rec("error", f"no profile range for input {tensor.name}")
                    return False
        return True


# ---- tensorrt: running -----------------------------------------------------------------------
ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32}


class _Engine:
    """Runs the ONNX of the plan with onnxruntime, on inputs read from the fake device memory."""

    def __init__(self, onnx_path, profiles, rec, memory):
        import onnxruntime as ort
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.rec, self.memory, self.profiles = rec, memory, profiles
        self.inputs = {n: (dims, np.dtype(ONNX_TO_NUMPY[t])) for n, dims, t in _onnx_io(onnx_path, "input")}
        self.outputs = {n: (dims, np.dtype(ONNX_TO_NUMPY[t])) for n, dims, t in _onnx_io(onnx_path, "output")}
        self.names = list(self.inputs) + list(self.outputs)

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_location(self, name):
        return "HOST" if name in SHAPE_TENSORS else "DEVICE"

    def get_tensor_shape(self, name):
        return _static({**self.inputs, **self.outputs}[name][0])

    def get_tensor_dtype(self, name):
        return {**self.inputs, **self.outputs}[name][1]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile = engine, {}, {}, 0

    def set_optimization_profile_async(self, index, stream):
        assert isinstance(stream, int) and 0 <= index < self.engine.num_optimization_profiles
        self.profile = index

    def set_input_shape(self, name, shape):
        """False (as TensorRT) for a shape outside this context's optimization profile."""
        shape = tuple(shape)
        declared = self.engine.inputs[name][0]
        low, _, high = self.engine.profiles[self.profile]["shapes"].get(name, (declared, declared, declared))
        if len(shape) != len(declared) or not all(lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            self.engine.rec("error", f"{name}: shape {shape} outside profile {self.profile}: {low}..{high}")
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer

    def _input_shape(self, name):
        dims = self.engine.inputs[name][0]
        return self.shapes.get(name, None if any(isinstance(d, str) for d in dims) else dims)

    def _shape_values(self):
        """The shape tensors' values, read from host memory where they are bound."""
        return {name: int(np.frombuffer(ctypes.string_at(self.addresses[name], 8), dtype=np.int64)[0])
                for name in SHAPE_TENSORS if name in self.addresses}

    def get_tensor_shape(self, name):
        """An input's bound shape; an output's declared dimensions resolved from the inputs, -1 where
        they do not determine it."""
        if name in self.engine.inputs:
            return self._input_shape(name) or _static(self.engine.inputs[name][0])
        symbols = {}
        for input_name, (dims, _) in self.engine.inputs.items():
            for d, size in zip(dims, self._input_shape(input_name) or ()):
                if isinstance(d, str) and d:
                    symbols[d] = size
        values = self._shape_values()
        resolved = []
        for d in self.engine.outputs[name][0]:
            if isinstance(d, int) or d in symbols:
                resolved.append(symbols.get(d, d))
            elif _product(d, symbols) is not None:   # assumption: "tiles*4" (a Reshape of static factors) is known
                resolved.append(_product(d, symbols))
            elif d in COMPUTED_DIMS:
                try:
                    resolved.append(COMPUTED_DIMS[d](symbols, values))
                except KeyError:
                    resolved.append(-1)
            else:
                resolved.append(-1)      # data-dependent: no IOutputAllocator, no size before running
        return tuple(resolved)

    def _read(self, name):
        dims, dtype = self.engine.inputs[name]
        shape = self._input_shape(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        pointer = self.addresses[name]
        on_host = name in SHAPE_TENSORS
        raw = ctypes.string_at(pointer, nbytes) if on_host else bytes(self.engine.memory[pointer][:nbytes])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def _values_in_profile(self) -> bool:
        ranges = self.engine.profiles[self.profile]["values"]
        for name, value in self._shape_values().items():
            low, _, high = ranges[name]
            if not low[0] <= value <= high[0]:
                self.engine.rec("error", f"shape tensor {name} = {value} outside profile {self.profile}")
                return False
        return True

    def execute_async_v3(self, stream):
        assert isinstance(stream, int)
        if any(self._input_shape(n) is None for n in self.engine.inputs) or not self._values_in_profile():
            return False
        feeds = {name: self._read(name) for name in self.engine.inputs}
        names = list(self.engine.outputs)
        results = dict(zip(names, self.engine.session.run(names, feeds)))
        self.engine.rec("infer", self.profile, {k: v.shape for k, v in feeds.items()})
        for name, value in results.items():
            shape = self.get_tensor_shape(name)
            assert value.shape == shape, f"fake TensorRT: {name} computed {value.shape}, declared {shape}"
            data = np.ascontiguousarray(value).tobytes()
            buffer = self.engine.memory[self.addresses[name]]
            assert len(data) <= len(buffer), f"fake TensorRT: {name} needs {len(data)} bytes, bound {len(buffer)}"
            buffer[:len(data)] = data
        return True


class _Runtime:
    def __init__(self, logger, rec, memory):
        self.rec, self.memory = rec, memory

    def deserialize_cuda_engine(self, plan):
        if not plan.startswith(PLAN_MAGIC):
            return None
        plan = json.loads(plan[len(PLAN_MAGIC):].decode())
        return _Engine(plan["onnx"], plan["profiles"], self.rec, self.memory)


def make_tensorrt(rec: Recorder, memory: dict, version: str = "10.15.1-fake") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in ("FP16", "BF16", "FP8", "INT8", "INT4", "FP4", "TF32")})
    trt.PreviewFeature = types.SimpleNamespace(MULTIDEVICE_RUNTIME_10_16="MULTIDEVICE_RUNTIME_10_16")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.TensorLocation = types.SimpleNamespace(HOST="HOST", DEVICE="DEVICE")
    trt.nptype = lambda dtype: dtype.type
    trt.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})
    trt.Builder = lambda logger: _Builder(logger, rec)
    trt.OnnxParser = lambda network, logger: _Parser(network, logger, rec)
    trt.Runtime = lambda logger: _Runtime(logger, rec, memory)
    return trt


def install(monkeypatch, devices: int = 1) -> tuple[Recorder, types.ModuleType, types.ModuleType]:
    """Put fake `tensorrt` and `cuda.bindings.runtime` modules in sys.modules for this test."""
    rec = Recorder()
    cudart = make_cudart(rec, devices)
    trt = make_tensorrt(rec, cudart.memory)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(_Parser, "reject", None)
    monkeypatch.setattr(_Builder, "fail", False)
    return rec, trt, cudart


def reject_parse(monkeypatch, node: str, op: str, desc: str) -> None:
    monkeypatch.setattr(_Parser, "reject", _ParserError(node, op, desc))


def fail_build(monkeypatch) -> None:
    monkeypatch.setattr(_Builder, "fail", True)


def plan_path(directory: Path) -> Path:
    return Path(directory) / "model.plan"
