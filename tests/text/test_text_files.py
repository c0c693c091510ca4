"""Which tokenizer files a checkpoint has and how they are read: one implementation (runtime/text.py) that the
build (l4compile/tokenizer_files.py) and the runtime share, so a build checks what the runtime will load."""

from __future__ import annotations

import json
import shutil

import pytest

from l4compile.errors import BuildError
from l4compile.runtime.text import chat_template_source, find_text_files, load_tokenizer
from l4compile.tokenizer_files import check_tokenizer, find_tokenizer, tokenizer_source
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


def test_the_build_refuses_a_template_the_runtime_could_not_compile(tokenizer_dir, tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, directory)
    check_tokenizer(find_text_files(directory), model_vocab(directory))
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(BuildError, match="chat_template.jinja: .*chat template does not compile"):
        check_tokenizer(find_text_files(directory), model_vocab(directory))
