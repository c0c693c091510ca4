"""`l4compile serve`'s own errors: one line and a non-zero exit, before anything is served."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from tests.serve.conftest import free_port

pytestmark = pytest.mark.slow


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "l4compile.cli", "serve", *args], capture_output=True, text=True,
                          timeout=300)


def test_a_build_without_a_tokenizer_is_one_line(built_tiny):
    result = serve(str(built_tiny("tiny-scout")), "--port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line(text_build):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = serve(str(text_build), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert result.stderr.startswith("l4compile: error: cannot listen on 127.0.0.1:") and \
        result.stderr.count("\n") == 1, result.stderr


def test_usage_errors_exit_2(text_build):
    for args in (["--max-batch", "0"], ["--request-timeout", "soon"], ["--port", "http"], ["--port", "99999"],
                 ["--port", "0"]):
        result = serve(str(text_build), *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_start_up_says_what_loading_took_and_quiet_says_nothing(start_server):
    output = start_server().output()
    assert re.search(r"^load engine +[\d.]+ s\nserving .* on http://127\.0\.0\.1:", output, re.M), output
    assert start_server("-q").output() == ""
