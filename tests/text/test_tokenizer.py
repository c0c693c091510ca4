"""The runtime's tokenizer and chat template against transformers' AutoTokenizer and apply_chat_template
on the same files, and streaming detokenization (byte-level and byte-fallback tokenizers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l4compile.runtime.chat import ChatTemplate, TemplateError
from l4compile.runtime.errors import RuntimeInputError
from l4compile.runtime.text import StreamDecoder, Tokenizer
from tests.text.llama4_tokenizer import CHAT_TEMPLATE, save_tokenizer

PROMPTS = ["The capital of France is", " leading space", "Hello 👋🏽 你好，世界！ café",
           "two\n\nlines\tand tabs  ",
           "<|header_start|>user<|header_end|> special tokens in text", "数字 12345 and 3.14", "😀" * 3]

CHATS = {
    "one user turn": [{"role": "user", "content": "Hi there"}],
    "system and multi-turn": [{"role": "system", "content": "  You are brief.  "},
                              {"role": "user", "content": "What is the capital of France?"},
                              {"role": "assistant", "content": "Paris."},
                              {"role": "user", "content": "And of Japan? 東京? 🗼"}],
    "content parts and an image": [{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": "Describe this."}]}],
    "tool result as JSON": [{"role": "user", "content": "weather?"},
                            {"role": "assistant", "content": "calling", "tool_calls": None},
                            {"role": "tool", "content": [{"temp": 21, "city": "Zürich <b>"}]}],
}


@pytest.fixture(scope="module", params=["chat_template.jinja", "template in tokenizer_config.json"])
def files(request, tmp_path_factory):
    directory = save_tokenizer(tmp_path_factory.mktemp("tok") / "t",
                               template_in_config=request.param != "chat_template.jinja")
    from transformers import AutoTokenizer
    ours = Tokenizer.load(directory / "tokenizer.json", directory / "tokenizer_config.json",
                          directory / "special_tokens_map.json")
    template = (directory / "chat_template.jinja").read_text() if (directory / "chat_template.jinja").is_file() \
        else ours.config["chat_template"]
    return ours, ChatTemplate(template, ours.special_tokens), AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_equal_autotokenizer(files, prompt):
    ours, _, hf = files
    assert ours.encode(prompt) == hf(prompt)["input_ids"]
    assert ours.encode(prompt, add_special_tokens=False) == hf(prompt, add_special_tokens=False)["input_ids"]
    ids = ours.encode(prompt)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)


@pytest.mark.parametrize("name", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_equal_apply_chat_template(files, name, add_generation_prompt):
    ours, template, hf = files
    text = template.render(CHATS[name], add_generation_prompt)
    assert text == hf.apply_chat_template(CHATS[name], add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.encode(text, add_special_tokens=False) == \
        hf.apply_chat_template(CHATS[name], add_generation_prompt=add_generation_prompt)["input_ids"]
    assert text.startswith("<|begin_of_text|>") and text.endswith(
        "<|header_start|>assistant<|header_end|>\n\n" if add_generation_prompt else "<|eot|>")


def test_template_environment_matches_transformers(files):
    """The helpers transformers gives templates: raise_exception, strftime_now, tojson without HTML escapes,
    loop controls, namespace, dict, {% generation %}, the special tokens and extra variables."""
    ours, _, hf = files
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
              "{% set ns.n = ns.n + 1 %}{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}"
              "|{{ ns.n }}|{{ bos_token }}{{ eos_token }}{{ pad_token }}|{{ dict(a=1) | tojson }}|{{ custom }}"
              "|{{ strftime_now('%Y') | length }}|{{ tools | tojson }}")
    messages = [{"role": "user", "content": "<a & b>"}, {"role": "user", "content": "é"},
                {"role": "user", "content": "never"}]
    ours_text = ChatTemplate(source, ours.special_tokens).render(messages, custom="x", tools=[{"name": "f"}])
    assert ours_text == hf.apply_chat_template(messages, chat_template=source, tokenize=False, custom="x",
                                               tools=[{"name": "f"}])
    assert '"<a & b>""é"|2|<|begin_of_text|><|eot|><|finetune_right_pad|>|{"a": 1}|x|4|' in ours_text


def test_chat_errors_are_clear(files):
    _, template, _ = files
    with pytest.raises(RuntimeInputError, match="message 1: unknown role 'robot'"):
        template.render([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(RuntimeInputError, match="non-empty list of messages"):
        template.render([])
    with pytest.raises(RuntimeInputError, match="'content' must be a string"):
        template.render([{"role": "user", "content": 3}])
    with pytest.raises(TemplateError, match="refused this conversation: Unknown role: robot"):
        ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<s>"}, roles=None).render([{"role": "robot", "content": "x"}])
    with pytest.raises(TemplateError, match="does not compile: .*line 1"):
        ChatTemplate("{% for m in messages %}{{ m.content }", {})
    with pytest.raises(TemplateError, match="refused"):   # the sandbox: no access to Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", {}).render(
            [{"role": "user", "content": "x"}])


# ---- streaming detokenization ------------------------------------------------------------
STREAM_TEXTS = ["Hello 👋🏽 world! 你好，世界！ 東京は日本の首都です。 🇫🇷 ❤️ done.", "   spaces first",
                "é" * 5 + " 👍🏽" * 3]


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2's layout): "▁" for spaces, byte-fallback tokens <0xNN> for
    characters outside the vocabulary, and a decoder that strips the leading space of the sequence."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    letters = list("abcdefghijklmnopqrstuvwxyzHWSTE!.,'") + ["▁"]
    vocab = {"<unk>": 0, **{f"<0x{i:02X}>": 1 + i for i in range(256)}}
    for token in letters + ["▁t", "he", "▁the", "▁w", "or", "ld"]:
        vocab[token] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "w"), ("o", "r"), ("l", "d")]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>"}, {})


@pytest.fixture(scope="module", params=["byte-level (Llama 4)", "byte-fallback (SentencePiece)"])
def stream_tokenizer(request, tmp_path_factory):
    if request.param.startswith("byte-fallback"):
        return byte_fallback_tokenizer()
    directory = save_tokenizer(tmp_path_factory.mktemp("tok") / "t")
    return Tokenizer.load(directory / "tokenizer.json", directory / "tokenizer_config.json")


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streamed_pieces_are_final_and_join_to_the_decoded_text(stream_tokenizer, text):
    ids = stream_tokenizer.encode(text, add_special_tokens=False)
    if stream_tokenizer.byte_run_ids and not text.isascii():   # byte fallback: emoji and CJK are byte tokens
        assert any(stream_tokenizer.backend.id_to_token(i).startswith("<0x") for i in ids)
    decoder = stream_tokenizer.stream_decoder()
    pieces = [decoder.step(i) for i in ids] + [decoder.finish()]
    full = stream_tokenizer.decode(ids)
    assert "".join(pieces) == full
    assert full == text   # leading spaces kept: the decoder's strip undoes the normalizer's prepended "▁"
    assert not any("\ufffd" in piece for piece in pieces)     # never half a character
    # tokenizers' own DecodeStream (Rust) emits the same pieces, except that a run of byte-fallback tokens is
    # held until it ends (DecodeStream emits its characters as they complete; see the test below)
    from tokenizers.decoders import DecodeStream
    rust = DecodeStream(skip_special_tokens=True)
    theirs = [rust.step(stream_tokenizer.backend, i) or "" for i in ids]
    if not stream_tokenizer.byte_run_ids:
        assert [p for p in pieces[:-1] if p] == [p for p in theirs if p]
    assert "".join(theirs) == full


def random_ids(tokenizer: Tokenizer, seed: int) -> list[int]:
    """What a model with random weights emits: any tokens, byte tokens that never complete a character, special
    tokens in between."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, tokenizer.vocab_size, int(rng.integers(1, 40))).tolist()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_pieces_of_random_ids_join_to_their_decoded_text(stream_tokenizer, skip_special_tokens):
    """A run of byte-fallback tokens decodes as a whole (one U+FFFD per byte where it is not valid UTF-8): a later
    byte can turn a character already complete into replacements, so the run is held until it ends."""
    for seed in range(300):
        ids = random_ids(stream_tokenizer, seed)
        decoder = stream_tokenizer.stream_decoder(skip_special_tokens)
        pieces = [decoder.step(i) for i in ids] + [decoder.finish()]
        assert "".join(pieces) == stream_tokenizer.decode(ids, skip_special_tokens), ids
    if stream_tokenizer.byte_run_ids:   # <0xD9><0xBC> is "ټ", but <0xD9><0xBC><0xBC> is three replacements
        run = [stream_tokenizer.token_id(f"<0x{byte:02X}>") for byte in (0xD9, 0xBC, 0xBC)]
        decoder = stream_tokenizer.stream_decoder()
        pieces = [decoder.step(i) for i in run] + [decoder.finish()]
        assert stream_tokenizer.decode(run[:2]) == "ټ" and pieces == ["", "", "", "\ufffd" * 3]


def test_stream_of_invalid_bytes_still_joins_to_the_decoded_text(stream_tokenizer):
    """What a random model emits: byte tokens that never complete a character; held, then flushed."""
    bytes_ = [stream_tokenizer.encode(c, add_special_tokens=False) for c in ("é", "👋", "a")]
    ids = [bytes_[1][0], bytes_[2][0], bytes_[0][-1], bytes_[1][0], bytes_[1][-1]] if len(bytes_[1]) > 1 \
        else [bytes_[0][0], bytes_[2][0]]
    decoder = StreamDecoder(stream_tokenizer)
    pieces = [decoder.step(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == stream_tokenizer.decode(ids) == decoder.text


def test_special_tokens_from_the_config(tmp_path):
    """Named special tokens, added tokens and add_bos_token/add_eos_token of tokenizer_config.json (transformers 5
    ignores the flags where tokenizer.json has a post-processor; so do we)."""
    from transformers import AutoTokenizer
    directory = save_tokenizer(tmp_path / "t")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=True, unk_token="<|reserved_special_token_0|>",
                  added_tokens_decoder={"900": {"content": "<|new|>", "special": True}})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.load(directory / "tokenizer.json", directory / "tokenizer_config.json")
    hf = AutoTokenizer.from_pretrained(directory)
    for text in ("x <|new|> y", "hello"):
        assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.special_tokens == hf.special_tokens_map
