"""Engine: a loaded build, run with onnxruntime on the CPU by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from l4compile.runtime.errors import BuildDirError, RuntimeInputError
from l4compile.runtime.manifest import Manifest


class Engine:
    """A compiled model ready to run. `Engine.load(build_dir)` reads the manifest and picks the backend."""

    def __init__(self, directory: Path, manifest: Manifest, session) -> None:
        self.directory = directory
        self.manifest = manifest
        self._session = session

    @classmethod
    def load(cls, directory: str | Path, providers: list[str] | None = None, threads: int | None = None) -> "Engine":
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if manifest.backend != "onnxruntime":
            raise BuildDirError(f"{directory}: backend {manifest.backend!r} is not available in this runtime")
        model = directory / manifest.files["model"]
        if not model.is_file():
            raise BuildDirError(f"{directory}: model file {manifest.files['model']} is missing")
        import onnxruntime as ort
        providers = providers or ["CPUExecutionProvider"]
        if manifest.dtype == "bfloat16" and providers == ["CPUExecutionProvider"]:
            raise BuildDirError(f"{directory}: a bfloat16 build needs a GPU execution provider (onnxruntime's CPU "
                                "provider has no bfloat16 kernels); rebuild with --dtype float16 or float32 for CPU")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model), options, providers=providers)
        return cls(directory, manifest, session)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """Validate token ids: int [batch, seq], non-empty, inside the vocabulary."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise RuntimeInputError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise RuntimeInputError(f"token ids must have shape [batch, seq], got rank {ids.ndim} {ids.shape}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise RuntimeInputError(f"token ids must be non-empty, got shape {ids.shape}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise RuntimeInputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if ids.shape[1] > self.manifest.max_position_embeddings:
            raise RuntimeInputError(f"sequence of {ids.shape[1]} tokens exceeds the model's maximum context "
                                    f"{self.manifest.max_position_embeddings}")
        return ids.astype(np.int64, copy=False)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full forward: ids int [batch, seq] -> float32 logits [batch, seq, vocab]."""
        ids = self.check_ids(ids)
        (logits,) = self._session.run(["logits"], {"input_ids": ids})
        return logits
