"""Text on the command line: `build --tokenizer`, `run --prompt/--prompt-file/--chat` (stdout carries the text
only), and the `chat` REPL (streamed answers, /reset, history within the context, Ctrl-C)."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import time

import pytest

from l4compile.runtime import Engine
from l4compile.text_cli import ChatSession, repl
from tests.conftest import spec_path

pytestmark = pytest.mark.slow
GREEDY = ("--temperature", "0")


def cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "l4compile.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def engine(text_build):
    return Engine.load(text_build)


def test_run_prompt_prints_the_completion_only(text_build, engine, tmp_path):
    r = cli("run", text_build, "--prompt", "The capital of France is", "--max-new-tokens", 20, *GREEDY)
    assert r.returncode == 0 and r.stdout == engine.complete("The capital of France is", 20, temperature=0)
    assert "generate" in r.stderr    # progress lines go to stderr; with --quiet, nothing does
    r = cli("run", text_build, "--prompt", "The capital of France is", "--max-new-tokens", 20, *GREEDY, "-q")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == engine.complete("The capital of France is", 20,
                                                                                temperature=0)
    (tmp_path / "prompt.txt").write_text("Once upon a time 🐉\n")
    r = cli("run", text_build, "--prompt-file", tmp_path / "prompt.txt", "--max-new-tokens", 12, "--seed", 4)
    assert r.returncode == 0 and r.stdout == engine.complete("Once upon a time 🐉\n", 12, seed=4)
    r = cli("run", text_build, "--prompt-file", "-", "--chat", "--system", "Be brief.", "--max-new-tokens", 12,
            *GREEDY, stdin="Hi there")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert r.stdout == engine.chat(messages, 12, temperature=0)


def test_run_text_errors_are_one_line(text_build, built_tiny):
    no_tokenizer = "has no tokenizer, so it takes token ids only; rebuild with `--tokenizer DIR`"
    for args, message in [((built_tiny("tiny-scout"), "--prompt", "Hi"), no_tokenizer),
                          ((text_build, "--prompt", "word " * 300), "the model's context is 256"),
                          ((text_build, "--prompt-file", "/no/such/file"), "cannot read it"),
                          ((text_build, "--prompt", "Hi", "--top-p", "2"), "top_p must be in")]:
        r = cli("run", *args, "-q")
        usage = "--top-p" in args   # a bad option value is a usage error (exit 2)
        assert r.returncode == (2 if usage else 1) and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1


def test_build_with_tokenizer_from_a_spec(tokenizer_dir, tmp_path):
    spec = tmp_path / "tiny-text.yaml"
    spec.write_text(spec_path("tiny-scout").read_text().replace("vocab_size: 256", "vocab_size: 512"))
    r = cli("build", spec, "--weights", "random", "--tokenizer", tokenizer_dir, "-o", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    from transformers import AutoTokenizer
    engine, given = Engine.load(tmp_path / "b"), AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = "Hello, world: the given tokenizer travelled into the build"
    assert engine.encode_prompt(prompt).tolist() == given(prompt)["input_ids"]
    assert isinstance(engine.complete("Hello", 3, temperature=0), str)
    r = cli("build", spec_path("tiny-scout"), "--weights", "random", "--tokenizer", tokenizer_dir, "-o", tmp_path / "c")
    assert r.returncode == 1 and re.search("the tokenizer has 4[0-9]{2} tokens but the model's vocabulary is 256",
                                           r.stderr)
    assert not (tmp_path / "c").exists()
    r = cli("build", spec, "--weights", "random", "--tokenizer", tmp_path, "-o", tmp_path / "d")
    assert r.returncode == 1 and "no tokenizer.json there" in r.stderr


def test_chat_repl_streams_keeps_history_and_resets(text_build, engine):
    r = cli("chat", text_build, "--max-new-tokens", 10, *GREEDY, stdin="Hello\nHow are you?\n/reset\nHow are you?\n")
    assert r.returncode == 0, r.stderr
    first = engine.chat([{"role": "user", "content": "Hello"}], 10, temperature=0)
    second = engine.chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "How are you?"}], 10, temperature=0)
    fresh = engine.chat([{"role": "user", "content": "How are you?"}], 10, temperature=0)
    assert second != fresh
    assert r.stdout == f"{first}\n{second}\n{fresh}\n"
    assert "(conversation reset)" in r.stderr


class InterruptAfter:
    """An engine whose answers raise KeyboardInterrupt (a Ctrl-C) after `pieces` pieces."""

    def __init__(self, engine, pieces: int) -> None:
        self.engine, self.pieces = engine, pieces

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def chat_stream(self, messages, max_new_tokens=None, **options):
        stream = self.engine.chat_stream(messages, max_new_tokens, **options)

        def interrupted():
            for i, piece in enumerate(stream):
                if i == self.pieces:
                    raise KeyboardInterrupt
                yield piece
        return interrupted()


def test_ctrl_c_stops_the_answer_not_the_session(engine):
    args = argparse.Namespace(system=None, max_new_tokens=30, temperature=0.0, top_k=None, top_p=None, seed=None)
    out, err = io.StringIO(), io.StringIO()
    assert repl(InterruptAfter(engine, 2), args, io.StringIO("Hello\n/reset\nHi\n"), out, err) == 0
    first = "".join(list(engine.chat_stream([{"role": "user", "content": "Hello"}], 30, temperature=0))[:2])
    lines = out.getvalue().split("\n")
    assert lines[0] == first and "(stopped)" in err.getvalue()
    assert lines[1] == "".join(list(engine.chat_stream([{"role": "user", "content": "Hi"}], 30, temperature=0))[:2])


def test_history_is_kept_within_the_context(engine):
    notices = []
    session = ChatSession(engine, system="Be brief.", max_new_tokens=16)
    for turn in range(6):   # each exchange is ~60 tokens: the context of 256 holds about three
        session.answer("tell me more " * 10 + str(turn), io.StringIO(), notices.append, temperature=0)
        messages = session.system + session.turns
        assert len(engine.encode_chat(messages, add_generation_prompt=False)) + 16 <= engine.max_context + 80
    assert any("context full: forgot the" in n for n in notices)
    assert session.turns[-2]["content"].endswith("5") and session.system[0]["content"] == "Be brief."
    assert len(session.turns) < 12


def test_ctrl_c_at_the_prompt_of_a_real_terminal(text_build):
    """In a pty: Ctrl-C at the prompt does not end the program; an answer follows; Ctrl-D exits 0."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(sys.executable, [sys.executable, "-m", "l4compile.cli", "chat", str(text_build),
                                  "--max-new-tokens", "8", "--temperature", "0"])
    output = b""

    def read_until(prompts: int, seconds: float = 120) -> None:
        """Read until the REPL has shown its "> " prompt `prompts` times."""
        nonlocal output
        deadline = time.time() + seconds
        while output.count(b"> ") < prompts and time.time() < deadline:
            try:
                output += os.read(fd, 4096)
            except OSError:
                break
        assert output.count(b"> ") >= prompts, output

    read_until(1)
    os.write(fd, b"\x03")            # Ctrl-C: SIGINT to the foreground process
    read_until(2)                    # a fresh prompt, the program still running
    os.write(fd, b"Hello\n")
    read_until(3)                    # the answer, then the next prompt
    os.write(fd, b"\x04")            # Ctrl-D: end of input
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.WEXITSTATUS(status) == 0, output
    assert b"Hello" in output and b"Traceback" not in output
