"""Which tokenizer files a checkpoint has and how they are read: one implementation (runtime/text.py) that the
build (l4compile/tokenizer_files.py) and the runtime share, so a build checks what the runtime will load."""

from __future__ import annotations

import json
import shutil

import pytest

from l4compile.errors import BuildError
from l4compile.runtime.chat import ChatTemplate
from l4compile.runtime.text import chat_template_source, find_text_files, load_tokenizer
from l4compile.tokenizer_files import check_tokenizer, find_tokenizer, generation_settings, tokenizer_source
from tests.text.llama4_tokenizer import model_vocab, save_tokenizer


def test_the_build_finds_the_files_the_runtime_names(tokenizer_dir):
    files = find_text_files(tokenizer_dir)
    assert {"tokenizer", "tokenizer_config", "chat_template"} <= set(files)
    assert files == find_tokenizer(tokenizer_dir)
    assert tokenizer_source(None, str(tokenizer_dir)) == str(tokenizer_dir)
    assert tokenizer_source(None, str(tokenizer_dir / "nothing-here")) is None
    with pytest.raises(BuildError, match="no tokenizer.json there"):
        find_tokenizer(tokenizer_dir.parent)


def test_named_templates_give_the_default_one(tmp_path):
    directory = save_tokenizer(tmp_path / "tok", template_in_config=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    files = find_text_files(directory)
    assert "chat_template" not in files
    assert chat_template_source(files, load_tokenizer(files)) == "plain"


def test_a_processors_chat_template_json_comes_after_tokenizer_config(tmp_path):
    """Llama 4's checkpoints keep the template in tokenizer_config.json and in the processor's chat_template.json:
    AutoTokenizer reads chat_template.jinja, else tokenizer_config.json's; chat_template.json alone is used too."""
    from transformers import AutoTokenizer
    directory = save_tokenizer(tmp_path / "tok", template_in_config=True)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "processor's {{ bos_token }}"}))
    files = find_text_files(directory)
    assert files["chat_template"].name == "chat_template.json"
    messages = [{"role": "user", "content": "Hi"}]
    hf = AutoTokenizer.from_pretrained(directory).apply_chat_template(messages, tokenize=False)
    source = chat_template_source(files, load_tokenizer(files))
    assert source == json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]
    assert ChatTemplate(source, load_tokenizer(files).special_tokens).render(messages, False) == hf

    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template_source(files, load_tokenizer(files)) == "processor's {{ bos_token }}"
    (directory / "chat_template.jinja").write_text("jinja's")
    files = find_text_files(directory)
    assert files["chat_template"].name == "chat_template.jinja"
    assert chat_template_source(files, load_tokenizer(files)) == "jinja's"


def test_the_build_refuses_a_template_the_runtime_could_not_compile(tokenizer_dir, tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, directory)
    check_tokenizer(find_text_files(directory), model_vocab(directory))
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(BuildError, match="chat_template.jinja: .*chat template does not compile"):
        check_tokenizer(find_text_files(directory), model_vocab(directory))


@pytest.mark.parametrize("config, settings", [
    ({"eos_token_id": [1, 7, 8], "do_sample": True, "temperature": 0.6, "top_p": 0.9},   # Llama 4's
     {"stop_tokens": [1, 7, 8], "sampling": {"temperature": 0.6, "top_k": 0, "top_p": 0.9}}),
    ({"eos_token_id": 2, "do_sample": True, "top_k": 20, "max_new_tokens": 64},
     {"stop_tokens": [2], "sampling": {"temperature": 1.0, "top_k": 20, "top_p": 1.0}, "max_new_tokens": 64}),
    ({"eos_token_id": 2, "temperature": 0.6, "top_p": 0.9},   # no do_sample: greedy, as transformers' generate
     {"stop_tokens": [2], "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0}}),
    ({}, {"sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0}}),
])
def test_generation_config_gives_stop_tokens_and_sampling_defaults(tmp_path, config, settings):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert generation_settings(tmp_path / "generation_config.json") == settings
    assert generation_settings(None) == {}


def test_a_bad_generation_config_fails_the_build(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": ["<|eot|>"]}))
    with pytest.raises(BuildError, match="generation_config.json: eos_token_id must be a token id or a list"):
        generation_settings(path)
    path.write_text("{not json")
    with pytest.raises(BuildError, match="generation_config.json: cannot read it"):
        generation_settings(path)
