"""Text on the command line: `run --prompt / --prompt-file [--chat]` and the `chat` REPL (registered by l4compile.cli).

stdout carries the model's text only (scripts can pipe it); prompts, notices and errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, TextIO

from l4compile.runtime.errors import RuntimeInputError

CHAT_HELP = ("commands: /image PATH (attach an image to your next message), /reset (forget the conversation), "
             "/exit (or Ctrl-D); Ctrl-C stops an answer")


def add_text_run_args(p: argparse.ArgumentParser, prompt_group) -> None:
    """`run`'s text inputs, in the group that already holds --prompt-ids."""
    prompt_group.add_argument("--prompt", help="a text prompt (needs a build with a tokenizer); prints the completion")
    prompt_group.add_argument("--prompt-file", metavar="FILE", help="read the text prompt from FILE ('-': stdin)")
    p.add_argument("--chat", action="store_true",
                   help="send the text prompt as a user message through the build's chat template")
    p.add_argument("--system", help="with --chat: a system message")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags a user gave; the rest come from the build's generation config."""
    options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if getattr(args, "stop_ids", None) is not None:
        options["stop_tokens"] = tuple(args.stop_ids)
    return {k: v for k, v in options.items() if v is not None}


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return _read_all(sys.stdin) if args.prompt_file == "-" else Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"--prompt-file {args.prompt_file}: cannot read it ({exc})") from None


def user_content(text: str, images: list | None) -> str | list[dict[str, str]]:
    """A user message's content: the text, with an image part per image before it unless the text marks
    where they go with `<|image|>` (Llama 4's processor examples put images first)."""
    from l4compile.runtime.image_prompts import IMAGE_PLACEHOLDER
    if not images or IMAGE_PLACEHOLDER in text:
        return text
    return [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]


def write_stream(pieces, out: TextIO) -> str:
    """Write text pieces as they come; returns the whole text."""
    written = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        written.append(piece)
    return "".join(written)


def run_text(engine, args: argparse.Namespace) -> int:
    """`run --prompt`: the completion (or, with --chat, the answer) on stdout."""
    prompt = read_prompt(args)
    options = sampling_options(args)
    images = getattr(args, "image", None) or None
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": user_content(prompt, images)}]
        stream = partial(engine.chat_stream, messages, args.max_new_tokens, images=images, **options)
    elif args.system:
        raise RuntimeInputError("--system needs --chat")
    else:
        stream = partial(engine.complete_stream, prompt, args.max_new_tokens, images=images, **options)
    from l4compile.progress import current
    progress = current()
    # The text goes to stdout as it comes; a live bar only where it cannot land in it.
    with progress.phase("generate", total=args.max_new_tokens, unit="token", live=not progress.shares_stdout) as task:
        write_stream(stream(on_token=lambda token: _count_token(task)), sys.stdout)
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0


def _count_token(task) -> None:
    task.advance(1)
    if task.count == 1:
        task.comment = f"first token after {task.elapsed():.3f} s"


class ChatSession:
    """A conversation kept within the model's context: the oldest turns go first, the system message stays."""

    def __init__(self, engine, system: str | None = None, max_new_tokens: int | None = None) -> None:
        self.engine = engine
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, Any]] = []
        self.max_new_tokens = max_new_tokens
        self.pending: list[tuple[Any, int]] = []   # images for the next message: (pixels [H, W, 3], prompt tokens)
        self._image_tokens: dict[int, int] = {}    # id() of an image part of the turns -> its prompt's tokens

    def reset(self) -> None:
        self.turns, self.pending, self._image_tokens = [], [], {}

    def attach(self, path: str) -> None:
        """Read an image now (errors come at once) for the next user message; its prompt length is kept."""
        import numpy as np
        from l4compile.runtime.preprocess import load_image
        tokens = self.engine.image_tokens()   # a text-only build says so
        image = load_image(path)
        self.pending.append((image, len(self.engine.prepare_images(np.array([tokens.image]), [image])[0][0])))

    def _length(self, messages: list[dict[str, Any]]) -> int:
        """Prompt tokens of a conversation: its rendered text, each image placeholder counted as its image's tokens."""
        text = len(self.engine.tokenizer.encode(self.engine.render_chat(messages), add_special_tokens=False))
        parts = [part for m in messages if isinstance(m["content"], list) for part in m["content"]
                 if part.get("type") == "image"]
        return text + sum(self._image_tokens.get(id(part), 1) - 1 for part in parts)

    def messages_for(self, text: str, notice: Callable[[str], None]) -> list[dict[str, Any]]:
        """The conversation with `text` (and the attached images) as the next user message, shortened to leave
        room for an answer."""
        room = self.max_new_tokens if self.max_new_tokens is not None else min(256, self.engine.max_context // 4)
        user: dict[str, Any] = {"role": "user", "content": text}
        if self.pending:
            images = [{"type": "image", "image": image} for image, _ in self.pending]
            self._image_tokens.update({id(part): count for part, (_, count) in zip(images, self.pending)})
            user["content"] = images + [{"type": "text", "text": text}]
        dropped = 0
        while True:
            messages = self.system + self.turns + [user]
            length = self._length(messages)
            if length + room <= self.engine.max_context or not self.turns:
                break
            self.turns = self.turns[2:] if len(self.turns) > 1 else []
            dropped += 1
        if dropped:
            notice(f"(context full: forgot the {dropped} oldest exchange{'s' if dropped > 1 else ''})")
        return messages

    def answer(self, text: str, out: TextIO, notice: Callable[[str], None], **options: Any) -> str:
        """Stream the answer to `text` into `out`; Ctrl-C stops it (what was said so far is kept)."""
        messages = self.messages_for(text, notice)
        pieces = self.engine.chat_stream(messages, self.max_new_tokens, **options)
        self.pending = []   # the images went with this message (an error above keeps them for the next try)
        said: list[str] = []
        try:
            for piece in pieces:
                said.append(piece)   # first: a Ctrl-C right after the user sees a piece keeps it in the history
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            pieces.close()
            notice("\n(stopped)")
        out.write("\n")
        out.flush()
        self.turns += [messages[-1], {"role": "assistant", "content": "".join(said)}]
        return "".join(said)


def _read_line(stdin: TextIO) -> str:
    """stdin.readline(), which a Ctrl-C interrupts even when the kernel hands the SIGINT to another thread.

    A signal interrupts a blocking read only in the thread it is delivered to; with onnxruntime's or the progress
    ticker's threads running, that is often not the main thread, and Python's handler (which runs in the main
    thread, between bytecodes) would wait for the next line. On a terminal, wait in short selects instead: the
    handler runs after each, and a terminal in canonical mode hands over whole lines, so nothing waits in a buffer.
    """
    import select
    if _is_terminal(stdin):
        while not select.select([stdin.fileno()], [], [], 0.1)[0]:
            pass
    return stdin.readline()


def _read_all(stdin: TextIO) -> str:
    """stdin.read(); typed at a terminal, line by line through `_read_line`, so that a Ctrl-C ends the wait
    (the engine's threads are running by then)."""
    if not _is_terminal(stdin):
        return stdin.read()
    lines = []
    while line := _read_line(stdin):
        lines.append(line)
    return "".join(lines)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # not a file (a test's stand-in), or closed
        return False


def repl(engine, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read a line, stream the answer; /reset, /exit, EOF. Errors of one turn are one line; the session goes on."""
    from l4compile.errors import L4Error
    from l4compile.progress import current
    session = ChatSession(engine, args.system, args.max_new_tokens)
    engine.chat_template   # a build without a template fails here, before the first prompt
    options = sampling_options(args)

    def notice(message: str) -> None:
        stderr.write(message + "\n")
        stderr.flush()

    notice(f"chatting with {engine.manifest.model_name} ({CHAT_HELP})")
    while True:
        try:                        # the prompt too: a Ctrl-C right after it is shown lands here
            stderr.write("> ")
            stderr.flush()
            line = _read_line(stdin)
        except KeyboardInterrupt:   # Ctrl-C at the prompt: a fresh line, like Python's REPL
            notice("")
            continue
        if not line:                # EOF (Ctrl-D, or the end of piped input)
            notice("")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            session.reset()
            notice("(conversation reset)")
            continue
        if text.strip().split(maxsplit=1)[0] == "/image":
            path = text.strip()[len("/image"):].strip()
            try:
                if not path:
                    raise RuntimeInputError("/image needs a file: /image PATH")
                session.attach(path)
                notice(f"(image {path} attached to your next message)")
            except L4Error as exc:
                notice(f"error: {exc}")
            continue
        try:   # -v: a line after each answer with its tokens, tokens/s and first token's latency
            with current().phase("answer", unit="token", live=False, summary=False) as task:
                session.answer(text, stdout, notice, on_token=lambda token: _count_token(task), **options)
        except L4Error as exc:
            notice(f"error: {exc}")
        except KeyboardInterrupt:   # before the answer began (preparing the prompt): nothing was said
            notice("(stopped)")


def cmd_chat(args: argparse.Namespace) -> int:
    from l4compile.progress import current
    from l4compile.runtime import Engine
    progress = current()
    with progress.phase("load engine"):
        engine = Engine.load(args.build, threads=args.threads, backend=args.backend)
        engine.chat_template   # a build without a tokenizer or template fails here: its error is the one line
    progress.flush()   # what loading took, before the first prompt
    return repl(engine, args, sys.stdin, sys.stdout, sys.stderr)


def add_sampling_args(p: argparse.ArgumentParser, ids: bool = False) -> None:
    """--temperature, --top-k, --top-p, --seed; `ids`: the command also takes --prompt-ids (greedy by default)."""
    from l4compile.runtime import options
    from l4compile.runtime.options import cli_type
    default = "the build's generation config's" + (" (text prompts; --prompt-ids: greedy)" if ids else "")
    p.add_argument("--temperature", type=cli_type(options.temperature, float, "a number"),
                   help=f"0: greedy (default: {default}, else greedy)")
    p.add_argument("--top-k", type=cli_type(options.top_k, int, "a count"), help=f"default: {default}, else no limit")
    p.add_argument("--top-p", type=cli_type(options.top_p, float, "a number"), help=f"default: {default}, else 1")
    p.add_argument("--seed", type=cli_type(options.seed, int, "a non-negative integer"))


def add_chat_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="an interactive chat with a build (its tokenizer and chat template), streamed")
    p.add_argument("build", help="build directory (built with a tokenizer: --weights HF_DIR or --tokenizer DIR)")
    p.add_argument("--system", help="a system message")
    from l4compile.runtime import options
    p.add_argument("--max-new-tokens", type=options.cli_type(options.max_new_tokens, int, "a count"),
                   help="longest answer (default: the generation config's, else 256)")
    add_sampling_args(p)
    p.add_argument("--threads", type=options.cli_type(options.threads, int, "a thread count"),
                   help="onnxruntime intra-op threads")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"])
    from l4compile.progress import add_progress_args
    add_progress_args(p)
    p.set_defaults(func=cmd_chat)
