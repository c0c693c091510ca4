"""The TensorRT backend: a serialized engine run through one execution context per optimization profile.

Imported only when a manifest says backend "tensorrt"; needs tensorrt and cuda-python. The KV
cache stays on the host, in the same buffers and with the same semantics as for onnxruntime
(runtime/kv_cache.py): each step copies the cached prefix to the device and the new keys and
values back, straight into the cache's slots where it can. That costs PCIe traffic per step; a
device-resident cache would avoid it (not done yet). Profile 0 runs prefill (an empty cache),
profile 1 one-token decode steps (l4compile.trt.profiles).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from l4compile.runtime.errors import BuildDirError, RuntimeInputError
from l4compile.runtime.kv_cache import KVCache
from l4compile.runtime.manifest import Manifest

PREFILL, DECODE = 0, 1


def _import_tensorrt() -> tuple[Any, Any]:
    import tensorrt
    try:
        from cuda.bindings import runtime as cudart   # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart
    return tensorrt, cudart


class TensorRTBackend:
    """Binds inputs and outputs by name (set_input_shape / set_tensor_address) and runs execute_async_v3."""

    def __init__(self, trt: Any, cudart: Any, runtime: Any, engine: Any, manifest: Manifest,
                 limits: dict[str, Any] | None = None) -> None:
        self._trt, self._cudart, self._runtime, self._engine = trt, cudart, runtime, engine
        self._kv = manifest.kv_cache
        self._limits = (manifest.trt or {}) if limits is None else limits
        # a vision build's text engine reads image features ([0, hidden] at a step without images)
        self._features = (manifest.vision or {}).get("features_input")
        self._hidden = (manifest.vision or {}).get("hidden_size")
        self._stream = self._cuda(cudart.cudaStreamCreate())
        self._handle = int(self._stream)    # TensorRT takes the stream as an integer handle
        self._contexts = []
        for profile in range(engine.num_optimization_profiles):
            context = engine.create_execution_context()
            context.set_optimization_profile_async(profile, self._handle)
            self._contexts.append(context)
        self._cuda(cudart.cudaStreamSynchronize(self._stream))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # Shape tensors (logits_start: it decides the logits' length) are read from host memory.
        self._on_host = {n for n in self._inputs if engine.get_tensor_location(n) == trt.TensorLocation.HOST}
        self._dynamic = {n for n in self._inputs if any(d < 0 for d in engine.get_tensor_shape(n))}
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._device: dict[str, tuple[int, int]] = {}    # tensor -> (device pointer, bytes)

    @classmethod
    def load(cls, directory: Path, manifest: Manifest) -> "TensorRTBackend":
        plan = directory / manifest.files.get("engine", "model.plan")
        if "engine" not in manifest.files or not plan.is_file():
            raise BuildDirError(f"{directory}: the manifest names TensorRT but the engine file is missing; "
                                f"run: l4compile engine {directory}")
        return cls(*_deserialize(directory, plan, manifest.trt or {}), manifest)

    @classmethod
    def load_vision(cls, directory: Path, manifest: Manifest) -> "TensorRTVisionRunner":
        """The vision engine of a vision build (vision.plan), behind the session interface VisionEncoder runs."""
        vision = manifest.vision or {}
        recorded = vision.get("trt") or {}
        plan = directory / ((vision.get("files") or {}).get("engine") or "vision.plan")
        if recorded.get("status") != "built" or not plan.is_file():
            raise BuildDirError(f"{directory}: the manifest names TensorRT but the vision engine is missing; "
                                f"run: l4compile engine {directory}")
        no_text = dataclasses.replace(manifest, kv_cache=None, vision=None)
        backend = cls(*_deserialize(directory, plan, recorded), no_text, recorded)
        return TensorRTVisionRunner(backend, int(recorded["max_tiles"]))

    def set_communicator(self, communicator: Any) -> None:
        """A rank of a sharded build: the NCCL communicator (a PyCapsule "ncclComm_t") its collectives use."""
        for context in self._contexts:
            context.set_communicator(communicator)

    def _text_inputs(self, ids: np.ndarray, image_features: np.ndarray | None) -> dict[str, np.ndarray]:
        if self._features is None:
            return {"input_ids": ids}
        if image_features is None:
            image_features = np.zeros((0, self._hidden), self._dtypes[self._features])
        return {"input_ids": ids, self._features: image_features}

    def forward(self, ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """A build without a KV cache: ids -> logits."""
        return self._run(PREFILL, self._text_inputs(ids, image_features), {})["logits"]

    def step(self, ids: np.ndarray, cache: KVCache, logits_start: int,
             image_features: np.ndarray | None = None) -> np.ndarray:
        """Run `ids` after the cached positions; new keys/values go into the cache. A vision build's engine
        also reads the image features of the step's image tokens (none at decode steps)."""
        kv = self._kv
        feeds = {**self._text_inputs(ids, image_features), kv["past_length"]: np.array(cache.length, dtype=np.int64),
                 kv["logits_start"]: np.array(logits_start, dtype=np.int64)}
        for layer, (keys, values) in zip(cache.layers, cache.views()):
            feeds[kv["past_key"].format(i=layer.index)] = keys
            feeds[kv["past_value"].format(i=layer.index)] = values
        into, copied = {}, []
        for n, (layer, slot) in enumerate(zip(cache.layers, cache.output_slots(ids.shape[1]))):
            names = kv["new_key"].format(i=layer.index), kv["new_value"].format(i=layer.index)
            if slot is None:
                copied.append((n, names))
            else:
                into.update(zip(names, slot))
        outputs = self._run(self._profile(cache.length, ids.shape[1]), feeds, into)
        cache.commit(ids.shape[1], {n: (outputs[k], outputs[v]) for n, (k, v) in copied})
        return outputs["logits"]

    def _profile(self, cached: int, new: int) -> int:
        if len(self._contexts) == 1 or cached == 0:
            return PREFILL
        if new != 1:
            raise RuntimeInputError(f"this TensorRT engine runs prefill (empty cache) and one-token decode steps; "
                                    f"got {new} tokens after {cached} cached")
        return DECODE

    def _run(self, profile: int, feeds: dict[str, np.ndarray], into: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, execute, copy outputs out (into the given host arrays where there are any)."""
        cudart, context = self._cudart, self._contexts[profile]
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        held = []   # host arrays TensorRT or a pending copy reads, alive until the stream is synchronized
        for name in self._inputs:
            array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            held.append(array)
            if name in self._dynamic and not context.set_input_shape(name, array.shape):
                raise RuntimeInputError(f"input {name} of shape {array.shape} is outside the engine's profile "
                                        f"(max batch {self._limits.get('max_batch')}, max seq "
                                        f"{self._limits.get('max_seq')}); rebuild with l4compile engine "
                                        "--max-batch/--max-seq")
            if name in self._on_host:
                context.set_tensor_address(name, array.ctypes.data)
                continue
            pointer = self._buffer(name, array.nbytes)
            self._cuda(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device, self._stream))
            context.set_tensor_address(name, pointer)
        results = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output {name} has a data-dependent shape {shape}: this backend has no "
                                   "IOutputAllocator for it")
            host = into.get(name)
            if host is None:
                host = np.empty(shape, dtype=self._dtypes[name])
            elif host.shape != shape or not host.flags.c_contiguous:
                raise RuntimeError(f"output {name}: engine shape {shape}, cache slot {host.shape}")
            context.set_tensor_address(name, self._buffer(name, host.nbytes))
            results[name] = host
        if not context.execute_async_v3(self._handle):
            raise RuntimeError("TensorRT execution failed (its log above says why)")
        for name, host in results.items():
            self._cuda(cudart.cudaMemcpyAsync(host.ctypes.data, self._device[name][0], host.nbytes, to_host,
                                              self._stream))
        self._cuda(cudart.cudaStreamSynchronize(self._stream))
        return results

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least `nbytes` for this tensor, grown (never shrunk) as steps need."""
        pointer, size = self._device.get(name, (0, 0))
        if nbytes > size or not pointer:
            if pointer:
                self._cuda(self._cudart.cudaFree(pointer))
            size = max(256, -(-nbytes // 256) * 256)    # never 0: empty tensors still need a valid address
            pointer = int(self._cuda(self._cudart.cudaMalloc(size)))
            self._device[name] = (pointer, size)
        return pointer

    def _cuda(self, result: Any) -> Any:
        """cuda-python calls return (error, values...): raise on an error, return the values."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error: {err}")
        return values[0] if len(values) == 1 else values or None

    def close(self) -> None:
        for pointer, _ in self._device.values():
            self._cudart.cudaFree(pointer)
        self._device.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TensorRTVisionRunner:
    """A vision engine behind the `run(outputs, feeds)` of an onnxruntime session (runtime/vision.py): pixel
    tiles in batches of at most `max_tiles` (the engine's profile), image features concatenated in order."""

    def __init__(self, backend: TensorRTBackend, max_tiles: int) -> None:
        self.backend, self.max_tiles = backend, max_tiles

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (name, pixels), = feeds.items()
        parts = [self.backend._run(PREFILL, {name: pixels[start:start + self.max_tiles]}, {})[outputs[0]]
                 for start in range(0, len(pixels), self.max_tiles)]
        return [np.concatenate(parts)]


def _deserialize(directory: Path, plan: Path, recorded: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(tensorrt, cudart, runtime, engine) of a serialized engine, or one BuildDirError saying why not."""
    try:
        trt, cudart = _import_tensorrt()
    except ImportError as exc:
        raise BuildDirError(f"{directory}: this build runs on TensorRT, but {exc.name} is not installed "
                            "(pip install -e '.[trt]' on a GPU host), or run its ONNX on onnxruntime: "
                            "`l4compile run --backend onnxruntime`, Engine.load(..., backend='onnxruntime')") from None
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))   # kept: it must outlive the engine
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise BuildDirError(f"{directory}: TensorRT {trt.__version__} could not load {plan.name} (built by "
                            f"TensorRT {recorded.get('tensorrt_version')} or for another GPU?); "
                            f"rebuild it here: l4compile engine {directory}")
    return trt, cudart, runtime, engine
