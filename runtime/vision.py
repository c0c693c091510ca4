"""The vision half of a multimodal build: pixel tiles -> image features, and the checks that tie features
to the image tokens of a prompt. The text model fuses the features at its input (manifest field `vision`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from l4compile.runtime.errors import BuildDirError, RuntimeInputError
from l4compile.runtime.manifest import Manifest


class VisionEncoder:
    """Runs the build's vision model: pixel_values [tiles, C, S, S] -> [tiles * tokens_per_tile, hidden], on
    onnxruntime or, where the build has a vision engine and runs on TensorRT, on TensorRT (`session` is an
    onnxruntime session or runtime/trt_backend.py's TensorRTVisionRunner: anything with `run(outputs, feeds)`)."""

    def __init__(self, info: dict, session) -> None:
        self.info = info
        self._session = session
        self.dtype = np.dtype(info["dtype"]) if info["dtype"] != "bfloat16" else None
        self.tokens_per_tile = int(info["tokens_per_tile"])
        self.hidden_size = int(info["hidden_size"])
        self.image_token = int(info["image_token"])

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, providers: list[str] | None = None,
             threads: int | None = None, backend: str = "onnxruntime") -> "VisionEncoder":
        info = manifest.vision
        if backend == "tensorrt":
            from l4compile.runtime.trt_backend import TensorRTBackend
            return cls(info, TensorRTBackend.load_vision(directory, manifest))
        if not info.get("files"):   # a rank of a sharded build: the encoder is in rank 0's folder
            raise BuildDirError(f"{directory}: this rank of a sharded build has no vision model of its own; load the "
                                "build's top directory")
        model = directory / info["files"]["model"]
        if not model.is_file():
            raise BuildDirError(f"{directory}: vision model file {info['files']['model']} is missing")
        import onnxruntime as ort
        from l4compile.runtime.ort_backend import create_session
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = create_session(model, options, providers or ["CPUExecutionProvider"], directory)
        check_session(directory, info, session)
        return cls(info, session)

    def check_pixels(self, pixel_values) -> np.ndarray:
        """float [tiles, C, S, S] with tiles >= 1, in the model's dtype."""
        pixels = np.asarray(pixel_values)
        c, s = self.info["num_channels"], self.info["image_size"]
        if pixels.dtype.kind != "f":
            raise RuntimeInputError(f"pixel_values must be floating point, got dtype {pixels.dtype}")
        if pixels.ndim != 4 or pixels.shape[1:] != (c, s, s) or pixels.shape[0] == 0:
            raise RuntimeInputError(f"pixel_values must have shape [tiles, {c}, {s}, {s}] with at least one tile, "
                                    f"got {pixels.shape}")
        if not np.isfinite(pixels).all():
            raise RuntimeInputError("pixel_values contain NaN or infinity")
        return pixels.astype(self.dtype, copy=False)

    def encode(self, pixel_values) -> np.ndarray:
        pixels = self.check_pixels(pixel_values)
        return self._session.run([self.info["output"]], {self.info["input"]: pixels})[0]

    def empty(self) -> np.ndarray:
        """The features of a step without images: [0, hidden]."""
        return np.zeros((0, self.hidden_size), dtype=self.dtype)

    def check_features(self, ids: np.ndarray, features) -> np.ndarray:
        """Features [n, hidden] whose n equals the number of image tokens in ids."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.hidden_size or features.dtype.kind != "f":
            raise RuntimeInputError(f"image features must be float [n, {self.hidden_size}], got {features.dtype} "
                                    f"{features.shape}")
        tokens = int((ids == self.image_token).sum())
        if tokens != features.shape[0]:
            tiles = features.shape[0] / self.tokens_per_tile
            raise RuntimeInputError(f"the prompt has {tokens} image tokens (id {self.image_token}) but the images give "
                                    f"{features.shape[0]} features ({tiles:g} tiles of {self.tokens_per_tile}); "
                                    f"expand the prompt with one image token per feature")
        return np.ascontiguousarray(features.astype(self.dtype, copy=False))


def check_session(directory: Path, info: dict, session) -> None:
    """The manifest's `vision` must name the model's input and output, and give the tile shape its input takes
    (else an edited manifest fails inside onnxruntime, or sizes the images it preprocesses wrongly)."""
    where = f"{directory / 'manifest.json'}: malformed manifest: vision"
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if info["input"] not in inputs:
        raise BuildDirError(f"{where}.input names {info['input']!r}, which {info['files']['model']} does not take")
    if info["output"] not in {o.name for o in session.get_outputs()}:
        raise BuildDirError(f"{where}.output names {info['output']!r}, which {info['files']['model']} does not give")
    shape = inputs[info["input"]]
    expected = [info["num_channels"], info["image_size"], info["image_size"]]
    if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected)):
        raise BuildDirError(f"{where}: tiles of {expected[0]}x{expected[1]}x{expected[2]} (num_channels, image_size), "
                            f"but {info['files']['model']} takes {shape}")
