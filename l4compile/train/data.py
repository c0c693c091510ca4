"""Training data: documents -> one token stream -> packed sequences -> a seeded, rank-split batch order.

Sources: a text file (one document), JSONL (one document per line: a string or an object with "text"),
both tokenized; or pre-tokenized ids, `.npy` (any integer array, flattened) or `.bin` (a raw uint16 stream
when the vocabulary fits in 16 bits, else uint32: nanoGPT's layout). Documents are joined with the spec's
bos/eos ids into one stream and cut into sequences of `seq_len`; the last, partial sequence is padded and
its padding is never a label. A seeded permutation holds out `eval_fraction` of the sequences; the rest
are visited in a fresh seeded order each epoch. The global batch of step s is a fixed list of sequences;
rank r of W takes the r-th of W equal slices, so ranks never overlap and the union is the same whatever W.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l4compile.errors import TrainError
from l4compile.spec.model import ModelSpec
from l4compile.train.loss import IGNORE_INDEX

TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Tokenizer:
    """`bytes`: UTF-8 bytes as ids (a vocabulary of at least 256), or a tokenizer.json read by the runtime's
    tokenizer (`l4compile.runtime.text`, with the tokenizer_config.json beside it when there is one)."""

    name: str
    encode_fn: object = None

    def encode(self, text: str) -> list[int]:
        if self.encode_fn is None:
            return list(text.encode("utf-8"))
        return self.encode_fn(text)

    @classmethod
    def load(cls, where: str, spec: ModelSpec) -> "Tokenizer":
        if where == "bytes":
            if spec.vocab_size < 256:
                raise TrainError(f"--tokenizer bytes needs a vocabulary of at least 256; {spec.name} has "
                                 f"{spec.vocab_size}")
            return cls("bytes")
        path = Path(where)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise TrainError(f"--tokenizer {where}: no tokenizer.json there (give the file, a directory "
                             "holding it, or 'bytes')")
        try:  # the runtime's tokenizer (with tokenizer_config.json's added tokens): text trains as it will run
            from l4compile.runtime.errors import BuildDirError
            from l4compile.runtime.text import Tokenizer as RuntimeTokenizer
        except ImportError:
            raise TrainError("text data needs the tokenizers package: pip install tokenizers") from None
        try:
            tok = RuntimeTokenizer.load(path, path.parent / "tokenizer_config.json")
        except (BuildDirError, ImportError) as exc:
            raise TrainError(f"--tokenizer {where}: {exc}") from None
        return cls(str(path), lambda text: tok.encode(text, add_special_tokens=False))


def find_tokenizer(explicit: str | None, init: str) -> str | None:
    """--tokenizer if given, else the tokenizer.json of an --init checkpoint directory, else None."""
    if explicit:
        return explicit
    if init != "random" and (Path(init) / "tokenizer.json").is_file():
        return str(Path(init) / "tokenizer.json")
    return None


def read_token_stream(path: str | Path, spec: ModelSpec, tokenizer: str | None) -> np.ndarray:
    """Every document of `path` as one int64 stream (bos + ids + eos per tokenized document)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise TrainError(f"--data {path}: not a numpy array file ({exc})") from None
        if not np.issubdtype(array.dtype, np.integer):
            raise TrainError(f"--data {path}: token ids must be integers, found {array.dtype}")
        stream = array.reshape(-1).astype(np.int64)
    elif suffix == ".bin":
        dtype = np.uint16 if spec.vocab_size <= 2**16 else np.uint32
        if path.stat().st_size % np.dtype(dtype).itemsize:
            raise TrainError(f"--data {path}: size is not a whole number of {np.dtype(dtype).name} ids")
        stream = np.fromfile(path, dtype=dtype).astype(np.int64)
    elif suffix in (".jsonl",) + TEXT_SUFFIXES:
        if tokenizer is None:
            raise TrainError(f"--data {path} is text: give --tokenizer tokenizer.json (or a checkpoint directory "
                             "holding one, or 'bytes'), or pre-tokenized ids as .npy/.bin")
        tok = Tokenizer.load(tokenizer, spec)
        stream = _encode_documents(_documents(path, suffix), tok, spec)
    else:
        raise TrainError(f"--data {path}: unknown format {suffix or '(no suffix)'}; expected .txt, .jsonl, "
                         ".npy or .bin")
    if stream.size == 0:
        raise TrainError(f"--data {path}: no tokens (the file is empty)")
    if stream.min() < 0 or stream.max() >= spec.vocab_size:
        bad = int(stream.max() if stream.max() >= spec.vocab_size else stream.min())
        raise TrainError(f"--data {path}: token id {bad} is outside the vocabulary of {spec.name} "
                         f"(0..{spec.vocab_size - 1}); was it tokenized for another model?")
    return stream


def _documents(path: Path, suffix: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if suffix != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainError(f"{path}:{number}: not JSON ({exc.msg})") from None
        doc = item.get("text") if isinstance(item, dict) else item
        if not isinstance(doc, str):
            raise TrainError(f"{path}:{number}: expected a string or an object with a \"text\" string")
        docs.append(doc)
    return docs


def _encode_documents(docs: list[str], tok: Tokenizer, spec: ModelSpec) -> np.ndarray:
    bos = [spec.tokens.bos] if spec.tokens.bos is not None else []
    eos = [spec.tokens.eos[0]] if spec.tokens.eos else []
    ids: list[int] = []
    for doc in docs:
        ids += bos + tok.encode(doc) + eos
    return np.array(ids, dtype=np.int64)


@dataclass
class PackedData:
    """Sequences [N, seq_len] (int64) and their labels (padding marked IGNORE_INDEX), split train/eval."""

    train_ids: np.ndarray
    train_labels: np.ndarray
    eval_ids: np.ndarray
    eval_labels: np.ndarray
    seed: int

    def global_batch(self, step: int, batch: int) -> np.ndarray:
        """Row indices into the training sequences of optimizer step `step` (0-based): consecutive slices of a
        seeded permutation per epoch, so a resumed run sees exactly what an uninterrupted one would."""
        n = len(self.train_ids)
        rows = []
        for position in range(step * batch, (step + 1) * batch):
            epoch, offset = divmod(position, n)
            rows.append(_epoch_order(self.seed, epoch, n)[offset])
        return np.array(rows, dtype=np.int64)


_ORDERS: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _ORDERS:
        _ORDERS.clear()
        _ORDERS[key] = np.random.default_rng([seed, 1, epoch]).permutation(n)
    return _ORDERS[key]


def pack(stream: np.ndarray, seq_len: int, pad_id: int, eval_fraction: float, seed: int) -> PackedData:
    """Cut the stream into sequences of seq_len (the tail padded) and hold out a seeded eval split."""
    n = -(-stream.size // seq_len)
    ids = np.full(n * seq_len, pad_id, dtype=np.int64)
    ids[:stream.size] = stream
    labels = ids.copy()
    labels[stream.size:] = IGNORE_INDEX
    ids, labels = ids.reshape(n, seq_len), labels.reshape(n, seq_len)
    n_eval = int(round(n * eval_fraction)) if n >= 2 else 0
    n_eval = min(max(n_eval, 1 if eval_fraction > 0 and n >= 2 else 0), n - 1)
    order = np.random.default_rng([seed, 0]).permutation(n)
    held, kept = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return PackedData(ids[kept], labels[kept], ids[held], labels[held], seed)
