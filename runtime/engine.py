"""Engine: a loaded build, run with onnxruntime on the CPU by default, or TensorRT where its manifest says so.

`logits` runs a full forward; `generate` and `stream` prefill once, then decode
token by token against a preallocated KV cache; `complete`, `chat`, `chat_stream` and
`generate_text` (runtime/text_api.py) take and return text. One step of the model is the
backend's (runtime/ort_backend.py, runtime/trt_backend.py); the cache, sampling
and generation are the Engine's, the same for every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from l4compile.runtime import integrity, options
from l4compile.runtime.errors import BuildDirError, RuntimeInputError
from l4compile.runtime.kv_cache import KVCache
from l4compile.runtime.manifest import Manifest
from l4compile.runtime.sampling import Sampling
from l4compile.runtime.text_api import TextGeneration
from l4compile.runtime.preprocess import ImageTokens
from l4compile.runtime.vision import VisionEncoder


class Engine(TextGeneration):
    """A compiled model ready to run. `Engine.load(build_dir)` reads the manifest and picks the backend.

    Token ids in and out here; text in and out (`complete`, `chat`, `chat_stream`, `generate_text`) in
    runtime/text_api.py, over the tokenizer and chat template the build carries.
    """

    def __init__(self, directory: Path, manifest: Manifest, backend, vision: VisionEncoder | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.backend = backend
        self.vision = vision      # the vision model of a multimodal build (onnxruntime or TensorRT), else None
        self._kv = manifest.kv_cache

    @classmethod
    def load(cls, directory: str | Path, providers: list[str] | None = None, threads: int | None = None,
             backend: str | None = None, verify: bool = False) -> "Engine":
        """`backend` overrides the manifest's ("onnxruntime" runs a TensorRT build's ONNX, e.g. to compare).

        The files of the build are checked against the manifest's records first: presence and sizes
        always, sha256 checksums too with `verify` (reads every byte once). Any fault is a BuildDirError
        naming the file.
        """
        directory, threads = Path(directory), options.threads(threads)
        manifest = Manifest.read(directory)
        # A TensorRT engine is the TensorRT backend's to look for (it says how to build a missing one).
        required = {role: name for role, name in manifest.files.items() if role != "engine"}
        integrity.check(directory, manifest.checksums, required, checksums=verify)
        if manifest.target == "ort-genai":
            raise BuildDirError(f"{directory}: an onnxruntime-genai build (--target ort-genai): load it with "
                                f"onnxruntime_genai.Model({str(directory)!r}); build --target onnx for this runtime")
        name = backend or manifest.backend
        sharded = bool((manifest.sharding or {}).get("ranks"))   # the whole of a build --tp N (not one rank)
        if sharded and name == "tensorrt":
            raise BuildDirError(f"{directory}: a sharded TensorRT build runs one engine per GPU: "
                                f"python -m l4compile.runtime.trt_launcher {directory} (or backend='onnxruntime' "
                                "to run every rank here on CPU)")
        rank = (manifest.sharding or {}).get("rank")
        if rank is not None and name == "onnxruntime":   # its collectives are TensorRT plugins
            raise BuildDirError(f"{directory}: rank {rank} of a sharded build: its graph runs on TensorRT only, with "
                                f"the other ranks; load the build's top directory ({directory.parent}) to run every "
                                "rank here on onnxruntime")
        if sharded and name == "onnxruntime":   # every rank in this process, host-reduced
            from l4compile.runtime.sharded_backend import ShardedOnnxRuntimeBackend
            text = ShardedOnnxRuntimeBackend.load(directory, manifest, providers, threads)
        elif name == "onnxruntime":
            from l4compile.runtime.ort_backend import OnnxRuntimeBackend
            text = OnnxRuntimeBackend.load(directory, manifest, providers, threads)
        elif name == "tensorrt":   # a vision build's vision engine runs on TensorRT too
            from l4compile.runtime.trt_backend import TensorRTBackend
            text = TensorRTBackend.load(directory, manifest)
        else:
            raise BuildDirError(f"{directory}: backend {name!r} is not available in this runtime")
        vision = VisionEncoder.load(directory, manifest, providers, threads, name) if manifest.vision else None
        return cls(directory, manifest, text, vision)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def max_context(self) -> int:
        return self.manifest.max_position_embeddings

    def check_ids(self, ids: np.ndarray, extra: int = 0) -> np.ndarray:
        """Validate token ids: int [batch, seq], non-empty, inside the vocabulary and the context."""
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
        if ids.shape[1] + extra > self.max_context:
            more = f" + {extra} new tokens" if extra else ""
            raise RuntimeInputError(f"sequence of {ids.shape[1]} tokens{more} exceeds the model's maximum context "
                                    f"{self.max_context}")
        return ids.astype(np.int64, copy=False)

    # ---- images -------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Image tiles float [tiles, C, S, S] -> image features [tiles * tokens_per_tile, hidden], which
        `logits` / `generate` / `stream` take as `image_features` (encode once, reuse)."""
        if self.vision is None:
            raise RuntimeInputError(f"{self.directory} is a text-only build: it has no vision model")
        return self.vision.encode(pixel_values)

    def image_tokens(self) -> "ImageTokens":
        """The ImageTokens of this build's image prompts: Llama 4's ids where the vocabulary is Llama 4's, else
        those its tokenizer names (`<|image_start|>`, ..., `<|patch|>`)."""
        if self.vision is None:
            raise RuntimeInputError(f"{self.directory} is a text-only build: it takes no images")
        if self.vision.info.get("prompt_tokens"):
            return ImageTokens(**self.vision.info["prompt_tokens"])
        if self.has_tokenizer:
            from l4compile.runtime.image_prompts import tokens_of
            tokens = tokens_of(self.tokenizer)
            if tokens is not None:
                return tokens
        raise RuntimeInputError("this build's vocabulary has no known image prompt tokens; pass tokens="
                                "ImageTokens(image_start, image_end, tile_x, tile_y, image, patch)")

    def prepare_images(self, ids, images: list, tokens=None, max_tiles: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """One prompt ids [seq] with an `<|image|>` placeholder per image, and the images (files, PIL images or
        arrays [H, W, 3]) -> (ids [1, seq'] expanded with each image's tokens, pixel_values [tiles, 3, S, S]) for
        `logits` / `generate` / `stream`. `tokens` (an ImageTokens) defaults to `image_tokens()`."""
        from l4compile.runtime.preprocess import expand_prompt, preprocess_image
        tokens = tokens or self.image_tokens()   # a text-only build fails here
        info = self.vision.info
        if tokens.patch != self.vision.image_token:
            raise RuntimeInputError(f"the patch token {tokens.patch} is not this model's image token "
                                    f"{self.vision.image_token}")
        tiles, grids = [], []
        for image in images:
            pixels, grid = preprocess_image(image, info["image_size"], max_tiles, info["num_channels"])
            tiles.append(pixels)
            grids.append(grid)
        expanded = expand_prompt(ids, grids, self.vision.tokens_per_tile, tokens)[None]
        empty = np.zeros((0, info["num_channels"], info["image_size"], info["image_size"]), np.float32)
        return expanded, np.concatenate(tiles) if tiles else empty

    def _image_features(self, ids: np.ndarray, pixel_values, image_features) -> np.ndarray | None:
        """The features a prefill fuses at the image tokens of ids (None for a text-only build)."""
        if self.vision is None:
            if pixel_values is not None or image_features is not None:
                raise RuntimeInputError(f"{self.directory} is a text-only build: it takes no images")
            return None
        if pixel_values is not None and image_features is not None:
            raise RuntimeInputError("give pixel_values or image_features, not both")
        if pixel_values is not None:
            self.vision.check_pixels(pixel_values)
            tiles = np.asarray(pixel_values).shape[0]
            self.vision.check_features(ids, np.zeros((tiles * self.vision.tokens_per_tile, self.vision.hidden_size),
                                                     np.float32))   # count first: no encoding for a bad prompt
            image_features = self.vision.encode(pixel_values)
        return self.vision.check_features(ids, self.vision.empty() if image_features is None else image_features)

    # ---- forward passes ---------------------------------------------------
    def logits(self, ids: np.ndarray, pixel_values: np.ndarray | None = None,
               image_features: np.ndarray | None = None) -> np.ndarray:
        """Full forward: ids int [batch, seq] -> float32 logits [batch, seq, vocab]. A vision build takes the
        prompt's images as pixel_values [tiles, C, S, S] or as features from `encode_images`; ids hold one image
        token per feature (tokens_per_tile per tile, in order)."""
        ids = self.check_ids(ids)
        features = self._image_features(ids, pixel_values, image_features)
        if self._kv is None:
            return self.backend.forward(ids) if features is None else self.backend.forward(ids, features)
        cache = self.new_cache(ids.shape[0], ids.shape[1])
        return self.step(ids, cache, logits_start=0, image_features=features)

    # ---- one step at a time (what a scheduler drives: `generate` is built on these) ----------------
    def new_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache for `step`: `batch` rows of at most `max_length` positions, in this build's layout.

        Preallocated here, once; RuntimeInputError (before allocating) when it would not fit in the memory
        available, BuildDirError for a build without a KV cache. An in-place cache (onnx-cpu builds) keeps a
        position per row (`cache.lengths`), and `cache.row(b)` / `cache.rows(start, stop)` are caches sharing its
        memory, so rows can be prefilled alone and decoded together; `cache.pieces(n)` says how a step of n
        tokens will be split.
        """
        if self._kv is None:
            raise BuildDirError(f"{self.directory}: this build has no KV cache; rebuild it to generate")
        return KVCache(self.manifest, options.integer("batch", batch, 1), options.integer("max_length", max_length, 1))

    def step(self, ids: np.ndarray, cache: KVCache, logits_start: int = 0,
             image_features: np.ndarray | None = None) -> np.ndarray:
        """Run ids int64 [batch, n] after the positions `cache` holds (from `new_cache`); their keys and values go
        into the cache, which advances by n. Returns float32 logits [batch, n - logits_start, vocab] of the new
        positions from `logits_start` on (n - 1: the last one only; n: none, for a prefill piece).

        The ids are not checked here (`check_ids` does that), nor is the room left in a sequence-major cache; an
        in-place cache refuses a step past its `max_length` (RuntimeInputError). A vision build's image features ([image tokens in ids, hidden], from `encode_images`)
        are fused at the image tokens of this step; a step without images may leave them out.
        """
        if self.vision is None:
            return self.backend.step(ids, cache, logits_start)
        features = self.vision.empty() if image_features is None else image_features
        return self.backend.step(ids, cache, logits_start, image_features=features)

    # ---- generation -------------------------------------------------------
    def generate(self, ids: np.ndarray | list[np.ndarray], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_tokens: tuple[int, ...] | None = None,
                 callback: Callable[[np.ndarray], None] | None = None, pixel_values: np.ndarray | None = None,
                 image_features: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        """ids int [batch, seq] -> [batch, seq + n], n <= max_new_tokens (greedy by default).

        Generation stops early once every row has produced a stop token (`default_stop_tokens` unless given);
        a finished row is filled with its stop token. `callback` receives each step's new tokens [batch].
        Images as in `logits`.

        A list of 1-D prompts of any lengths (a ragged batch, text only) gives a list of 1-D arrays: each
        prompt followed by its new tokens, up to and including its first stop token; each row's tokens
        are those of that prompt generated alone (with the same seed: every row samples from its own
        generator). `callback` then receives each step's new tokens of every row [batch].
        """
        max_new_tokens, seed, stop_tokens = _generation_options(max_new_tokens, seed, stop_tokens)
        sampling = Sampling(temperature, top_k, top_p)
        if isinstance(ids, (list, tuple)) and ids and all(np.ndim(row) == 1 for row in ids):
            return self._generate_rows(list(ids), max_new_tokens, sampling, seed, stop_tokens, callback)
        ids = self.check_ids(ids, extra=max_new_tokens)
        features = self._image_features(ids, pixel_values, image_features)
        rows = [ids]
        for tokens in self._decode(ids, max_new_tokens, sampling, seed, stop_tokens, features):
            rows.append(tokens[:, None])
            if callback:
                callback(tokens)
        return np.concatenate(rows, axis=1)

    def stream(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop_tokens: tuple[int, ...] | None = None,
               pixel_values: np.ndarray | None = None, image_features: np.ndarray | None = None) -> Iterator[int]:
        """One prompt (ids [seq]); yields each new token as it is decided."""
        max_new_tokens, seed, stop_tokens = _generation_options(max_new_tokens, seed, stop_tokens)
        sampling = Sampling(temperature, top_k, top_p)
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise RuntimeInputError(f"stream takes one prompt of shape [seq], got shape {ids.shape}")
        ids = self.check_ids(ids[None], extra=max_new_tokens)
        features = self._image_features(ids, pixel_values, image_features)
        for tokens in self._decode(ids, max_new_tokens, sampling, seed, stop_tokens, features):
            yield int(tokens[0])

    def _generate_rows(self, prompts: list[np.ndarray], max_new_tokens: int, sampling: Sampling,
                       seed: int | None, stop_tokens: tuple[int, ...] | None,
                       callback: Callable[[np.ndarray], None] | None) -> list[np.ndarray]:
        """A ragged batch: each row prefilled alone into its row of one batch cache, then decoded together
        (one token per row per step, every row at its own position)."""
        rows = [self.check_ids(np.asarray(row)[None], extra=max_new_tokens)[0] for row in prompts]
        self._check_generation(max_new_tokens)
        if not self.manifest.kv_cache.get("in_place"):   # one position per batch: rows run one after another
            outs = [self.generate(row[None], max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                                  seed, stop_tokens)[0] for row in rows]
            return [self._until_stop(out, len(row), stop_tokens) for out, row in zip(outs, rows)]
        cache = self.new_cache(len(rows), max(len(row) for row in rows) + max_new_tokens)

        def prefill() -> np.ndarray:
            return np.concatenate([self.step(row[None], cache.row(b), logits_start=len(row) - 1)[:, -1]
                                   for b, row in enumerate(rows)], axis=0)

        rngs = [np.random.default_rng(seed) for _ in rows]
        new: list[list[int]] = [[] for _ in rows]
        for tokens in self._decode_steps(cache, prefill, max_new_tokens, sampling, rngs, stop_tokens):
            for b, token in enumerate(tokens.tolist()):
                new[b].append(token)
            if callback:
                callback(tokens)
        return [self._until_stop(np.concatenate([row, np.array(n, dtype=np.int64)]), len(row), stop_tokens)
                for row, n in zip(rows, new)]

    @property
    def default_stop_tokens(self) -> tuple[int, ...]:
        """The stop tokens of `stop_tokens=None`: the checkpoint's generation_config.json's, else the spec's eos."""
        stops = self.text_settings.get("stop_tokens")
        return tuple(int(t) for t in (stops if stops is not None else self.manifest.tokens.get("eos") or ()))

    def _stops(self, stop_tokens: tuple[int, ...] | None) -> np.ndarray:
        return np.array(sorted(set(stop_tokens if stop_tokens is not None else self.default_stop_tokens)),
                        dtype=np.int64)

    def _until_stop(self, out: np.ndarray, prompt: int, stop_tokens: tuple[int, ...] | None) -> np.ndarray:
        """A row's prompt and new tokens up to and including its first stop token."""
        hits = np.nonzero(np.isin(out[prompt:], self._stops(stop_tokens)))[0]
        return out[:prompt + hits[0] + 1] if len(hits) else out

    def _check_generation(self, max_new_tokens: int) -> None:
        if self._kv is None:
            raise BuildDirError(f"{self.directory}: this build has no KV cache; rebuild it to generate")
        if max_new_tokens < 0:
            raise RuntimeInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")

    def _decode(self, ids: np.ndarray, max_new_tokens: int, sampling: Sampling, seed: int | None,
                stop_tokens: tuple[int, ...] | None, image_features: np.ndarray | None = None) -> Iterator[np.ndarray]:
        self._check_generation(max_new_tokens)
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)

        def prefill() -> np.ndarray:   # image features are fused at the prefill; decode steps embed text
            return self.step(ids, cache, logits_start=ids.shape[1] - 1, image_features=image_features)[:, -1]

        yield from self._decode_steps(cache, prefill, max_new_tokens, sampling, np.random.default_rng(seed),
                                      stop_tokens)

    def _decode_steps(self, cache: KVCache, prefill: Callable[[], np.ndarray], max_new_tokens: int,
                      sampling: Sampling, rng: np.random.Generator | list[np.random.Generator],
                      stop_tokens: tuple[int, ...] | None) -> Iterator[np.ndarray]:
        """Prefill, then one token per row per step; `rng` is one generator for the batch or one per row."""
        stops = self._stops(stop_tokens)
        done = np.zeros(cache.batch, dtype=bool)
        last = np.zeros(cache.batch, dtype=np.int64)
        for step in range(max_new_tokens):
            logits = prefill() if step == 0 else self.step(last[:, None], cache, logits_start=0)[:, -1]
            if isinstance(rng, list):
                chosen = np.concatenate([sampling.choose(logits[b:b + 1], r) for b, r in enumerate(rng)])
            else:
                chosen = sampling.choose(logits, rng)
            tokens = np.where(done, last, chosen).astype(np.int64)
            yield tokens
            done |= np.isin(tokens, stops)
            last = tokens
            if done.all():
                return


def _generation_options(max_new_tokens, seed, stop_tokens) -> tuple[int, int | None, tuple[int, ...] | None]:
    return options.max_new_tokens(max_new_tokens), options.seed(seed), options.stop_tokens(stop_tokens)
