"""Progress of the text commands: `run --prompt` counts its tokens on stderr (the text alone on stdout), and
`chat` says what loading the engine took before its first prompt (and, with -v, each answer's tokens/s)."""

from __future__ import annotations

import io
import re
import sys

import pytest

from l4compile.cli import main
from l4compile.runtime import Engine
from tests.text.conftest import text_build, text_checkpoint, tokenizer_dir  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.slow


def test_run_prompt_counts_tokens_with_rate_and_first_token_time(text_build, capsys, monkeypatch):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "0")
    tokens: list[int] = []
    text = "".join(Engine.load(text_build).complete_stream("Once upon a time", 8, temperature=0,
                                                             on_token=tokens.append))
    assert tokens
    assert main(["run", str(text_build), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == text                      # stdout: the text, nothing else
    (line,) = [line for line in err.splitlines() if line.startswith("generate  ")]
    assert re.search(rf"  {len(tokens)} tokens?, [\d.,]+ tokens/s, first token after [\d.]+ s$", line), err
    if len(tokens) > 1:                     # a status line between tokens: count of the most, time left
        assert re.search(r"^generate: 1/8 tokens, .* elapsed, about .* left$", err, re.M), err
    assert err.splitlines()[-1].startswith("run finished in ")


def test_chat_says_what_loading_took_before_its_first_prompt(text_build, capsys, monkeypatch):
    monkeypatch.setenv("L4COMPILE_PROGRESS_INTERVAL", "60")   # held lines: shown before the prompt all the same
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", str(text_build), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert re.match(r"load engine +[\d.]+ s\nchatting with ", err), err
    assert not re.search(r"^answer ", err, re.M)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))
    assert main(["chat", str(text_build), "--max-new-tokens", "4", "--temperature", "0", "-v"]) == 0
    answers = re.findall(r"^(?:> )?answer +[\d.]+ s  (\d) tokens?, [\d.,]+ tokens/s, first token after [\d.]+ s$",
                         capsys.readouterr().err, re.M)
    assert len(answers) == 2 and all(1 <= int(n) <= 4 for n in answers)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", str(text_build), "--max-new-tokens", "4", "--temperature", "0", "-q"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("chatting with ") and "load engine" not in err and "finished in" not in err
