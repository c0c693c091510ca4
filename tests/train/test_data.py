"""Data: formats, packing, the held-out split, and global batches split over ranks without overlap."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l4compile.errors import TrainError
from l4compile.spec import load_spec
from l4compile.train.data import pack, read_token_stream
from l4compile.train.loss import IGNORE_INDEX
from tests.train.conftest import TINY_SCOUT


@pytest.fixture(scope="module")
def spec():
    return load_spec(TINY_SCOUT)


def test_formats_give_the_same_stream(spec, tmp_path):
    ids = np.arange(3, 203) % spec.vocab_size
    np.save(tmp_path / "ids.npy", ids.reshape(20, 10))
    ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
    np.testing.assert_array_equal(read_token_stream(tmp_path / "ids.npy", spec, None), ids)
    np.testing.assert_array_equal(read_token_stream(tmp_path / "ids.bin", spec, None), ids)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps("c") + "\n")
    # bos=1, eos=2 frame each document; bytes as ids
    assert read_token_stream(tmp_path / "docs.jsonl", spec, "bytes").tolist() == [1, 97, 98, 2, 1, 99, 2]


def test_text_without_tokenizer_and_foreign_ids_are_errors(spec, tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(TrainError, match="--tokenizer"):
        read_token_stream(tmp_path / "a.txt", spec, None)
    np.save(tmp_path / "big.npy", np.array([1, 2, spec.vocab_size]))
    with pytest.raises(TrainError, match="outside the vocabulary"):
        read_token_stream(tmp_path / "big.npy", spec, None)


def test_packing_split_and_rank_slices(spec):
    data = pack(np.arange(1, 1000), seq_len=10, pad_id=0, eval_fraction=0.1, seed=3)
    assert data.train_ids.shape == (90, 10) and data.eval_ids.shape == (10, 10)
    assert (data.train_labels == IGNORE_INDEX).sum() + (data.eval_labels == IGNORE_INDEX).sum() == 1  # the padded tail
    held = {tuple(r) for r in data.eval_ids}
    assert not held & {tuple(r) for r in data.train_ids}
    # one epoch of batches of 9 visits every training sequence once; rank slices partition each batch
    seen = np.concatenate([data.global_batch(step, 9) for step in range(10)])
    assert sorted(seen) == list(range(90))
    batch = data.global_batch(4, 9)
    slices = np.array_split(batch, 3)
    assert sorted(np.concatenate(slices)) == sorted(batch)
    assert not (set(data.global_batch(10, 9)) == set(data.global_batch(0, 9)) and
                (data.global_batch(10, 9) == data.global_batch(0, 9)).all())  # a new order each epoch


def test_text_through_a_tokenizer_json(spec, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "hello": 5, "world": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("hello world hello")
    assert read_token_stream(tmp_path / "a.txt", spec, str(tmp_path)).tolist() == [1, 5, 6, 5, 2]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(TrainError, match="--tokenizer"):
        read_token_stream(tmp_path / "a.txt", spec, str(tmp_path / "bad"))
