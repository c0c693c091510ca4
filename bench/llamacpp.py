"""llama.cpp as a peer for the benchmarks: build it once, convert our HF checkpoints to GGUF, run it.

The peer is the llama.cpp tree vendored in the llama-cpp-python 0.3.36 source distribution on PyPI
(ggml-org/llama.cpp 0c1e57098), built once, Release, shared libraries, into a cache directory outside
the repository (~/.cache/l4compile-bench, or $L4COMPILE_BENCH_CACHE). Instruction sets: this machine's
(AVX2, FMA, F16C, AVX-VNNI, AVX-512 F/BW/DQ/VL, VBMI, VNNI, BF16) spelled out rather than
`GGML_NATIVE`, because this VM's CPU advertises AMX but the hypervisor does not enable it: a native
build's AMX kernels (Q8_0 / Q4_0 prompt processing) die with SIGILL.

- `LlamaCpp.ensure()` finds the source distribution (/work/peer, the cache, or `pip download
  llama-cpp-python==0.3.36 --no-binary :all: --no-deps`), unpacks it and builds llama-bench,
  llama-quantize and libllama, printing cmake's progress; later calls reuse the build.
- `convert(hf_dir, out_dir, tiers)` writes GGUF files with llama.cpp's own converter
  (convert_hf_to_gguf.py, with the vendored gguf-py) at F32, then `llama-quantize` for Q8_0 / Q4_0.
  Our random-weight checkpoints have no tokenizer, and the converter only accepts tokenizers whose
  pre-tokenizer it recognises by hash: the one thing the wrapper changes is the vocabulary it writes
  (a synthetic byte-level BPE vocabulary of the spec's size). The benchmarks feed token ids, never text.
- `bench(gguf, ...)` runs `llama-bench -o json` (prompt processing / token generation tok/s, at a
  depth of cached tokens), each call its own process.
- `Model(gguf, ...)` loads libllama through llama-cpp-python's ctypes bindings (its `llama_cpp.llama_cpp`
  module, without the high-level package): logits of every prompt position, greedy continuation.

llama.cpp hard-codes Llama 4's chunk size and temperature floor (8192) and ignores a file's values:
compare on specs with both at 8192 (specs/bench-16e-8k.yaml, specs/bench-1b5.yaml).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
TIERS = {"F32": None, "Q8_0": "Q8_0", "Q4_0": "Q4_0"}          # GGUF tier -> llama-quantize type
TARGETS = ("llama-bench", "llama-quantize", "llama")
ISA = ("NATIVE=OFF", "AVX=ON", "AVX2=ON", "FMA=ON", "F16C=ON", "BMI2=ON", "AVX_VNNI=ON", "AVX512=ON",
       "AVX512_VBMI=ON", "AVX512_VNNI=ON", "AVX512_BF16=ON")


def cache_dir() -> Path:
    return Path(os.environ.get("L4COMPILE_BENCH_CACHE", Path.home() / ".cache" / "l4compile-bench"))


def log(message: str) -> None:
    print(f"[llama.cpp] {message}", flush=True)


@dataclass
class LlamaCpp:
    source: Path          # the unpacked source distribution (llama_cpp/ bindings, vendor/llama.cpp)
    build: Path           # cmake build directory (bin/ holds the tools and shared libraries)

    @property
    def tree(self) -> Path:
        return self.source / "vendor" / "llama.cpp"

    @property
    def bin(self) -> Path:
        return self.build / "bin"

    def tool(self, name: str) -> Path:
        return self.bin / name

    @classmethod
    def ensure(cls, jobs: int = 2) -> "LlamaCpp":
        """The built peer: unpack and build on first use (minutes), reuse afterwards."""
        root = cache_dir()
        peer = cls(root / f"src-{VERSION}", root / f"build-{VERSION}")
        if all((peer.bin / f).exists() for f in ("llama-bench", "llama-quantize", "libllama.so")):
            return peer
        root.mkdir(parents=True, exist_ok=True)
        if not (peer.tree / "CMakeLists.txt").exists():
            archive = _find_sdist(root)
            log(f"unpacking {archive}")
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
            (root / f"llama_cpp_python-{VERSION}").rename(peer.source)
        log(f"configuring {peer.tree} (Release, AVX-512 without AMX, shared libraries) into {peer.build}")
        subprocess.run(["cmake", "-S", str(peer.tree), "-B", str(peer.build), "-DCMAKE_BUILD_TYPE=Release",
                        *[f"-DGGML_{flag}" for flag in ISA], "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                        "-DLLAMA_OPENSSL=OFF"], check=True, stdout=subprocess.DEVNULL)
        log(f"building {', '.join(TARGETS)} with {jobs} jobs (several minutes on 2 cores)")
        proc = subprocess.Popen(["cmake", "--build", str(peer.build), "-j", str(jobs), "--target", *TARGETS],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if line.startswith("["):
                log(line.strip())
        if proc.wait() != 0:
            raise SystemExit("llama.cpp build failed (run cmake --build by hand in the cache to see why)")
        return peer

    # ---- GGUF ---------------------------------------------------------------------------

    def convert(self, hf_dir: Path, out_dir: Path, tiers=tuple(TIERS)) -> dict[str, Path]:
        """GGUF files of an HF Llama 4 checkpoint: F32 by the converter, the others by llama-quantize."""
        out_dir.mkdir(parents=True, exist_ok=True)
        f32 = out_dir / "model-F32.gguf"
        if not f32.exists():
            log(f"converting {hf_dir} to {f32}")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.tree), str(self.tree / "gguf-py")])}
            subprocess.run([sys.executable, "-c", CONVERT, str(self.tree / "convert_hf_to_gguf.py"), str(hf_dir),
                            "--outtype", "f32", "--outfile", str(f32)], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        files = {}
        for tier in tiers:
            path = out_dir / f"model-{tier}.gguf"
            if TIERS[tier] is not None and not path.exists():
                log(f"llama-quantize {tier}")
                subprocess.run([str(self.tool("llama-quantize")), str(f32), str(path), TIERS[tier]], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            files[tier] = path
        return files

    # ---- llama-bench --------------------------------------------------------------------

    def bench(self, gguf: Path, threads: int, prompt: int = 0, generate: int = 0, depth: int = 0,
              repetitions: int = 1, batch: int = 2048) -> dict[str, float]:
        """llama-bench's tok/s: {"prefill": ...} for `prompt` > 0, {"decode": ...} for `generate` > 0,
        both after `depth` cached tokens (filled untimed)."""
        cmd = [str(self.tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
               "-n", str(generate), "-d", str(depth), "-r", str(repetitions), "-b", str(batch),
               "-ub", str(min(batch, 512)), "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        result = {}
        for row in json.loads(out.stdout):
            key = "prefill" if row["n_prompt"] > 0 else "decode"
            result[key] = float(row["avg_ts"])
        return result


def _find_sdist(root: Path) -> Path:
    for candidate in (Path("/work/peer") / SDIST, root / SDIST):
        if candidate.exists():
            return candidate
    log(f"downloading the llama-cpp-python {VERSION} source distribution from PyPI")
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-binary", ":all:",
                    "--no-deps", "-d", str(root)], check=True)
    return root / SDIST


# The converter, run as `python -c CONVERT convert_hf_to_gguf.py ARGS...`, with one change: the vocabulary.
CONVERT = r'''
import json, runpy, sys
from pathlib import Path
import gguf
from conversion.llama import Llama4Model

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]

def synthetic_vocab(self):
    """A byte-level BPE vocabulary of the config's size: the 256 byte symbols, then placeholders."""
    config = json.loads((Path(self.dir_model) / "config.json").read_text())
    size = self.hparams["vocab_size"]
    special = {config.get("bos_token_id"), config.get("pad_token_id")}
    eos = config.get("eos_token_id")
    special |= set(eos if isinstance(eos, list) else [eos])
    special.discard(None)
    symbols = bytes_to_unicode()
    tokens, types = [], []
    for i in range(size):
        if i in special:
            tokens.append(f"<|special_{i}|>"); types.append(gguf.TokenType.CONTROL)
        elif i - 3 < 256 and i >= 3:
            tokens.append(symbols[i - 3]); types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"<t{i}>"); types.append(gguf.TokenType.NORMAL)
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default")
    w.add_token_list(tokens); w.add_token_types(types); w.add_token_merges(["a b"])
    if config.get("bos_token_id") is not None:
        w.add_bos_token_id(config["bos_token_id"])
    if eos is not None:
        w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if config.get("pad_token_id") is not None:
        w.add_pad_token_id(config["pad_token_id"])
    w.add_add_bos_token(False)

Llama4Model.set_vocab = synthetic_vocab
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


class Model:
    """A GGUF model in this process through llama-cpp-python's ctypes bindings over our libllama."""

    def __init__(self, peer: LlamaCpp, gguf: Path, threads: int, context: int = 4096) -> None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(peer.bin)
        lib = _bindings(peer)
        self.lib = lib
        lib.llama_backend_init()
        lib.llama_log_set(_QUIET, ctypes.c_void_p())
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = context
        cparams.n_batch = cparams.n_ubatch = min(context, 512)
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch_size = cparams.n_batch

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Run `ids` at positions start.. (in batches); logits of every position or of the last one."""
        lib, out = self.lib, []
        for offset in range(0, len(ids), self.batch_size):
            piece = ids[offset:offset + self.batch_size]
            batch = lib.llama_batch_init(len(piece), 0, 1)
            try:
                batch.n_tokens = len(piece)
                last = offset + len(piece) == len(ids)
                for i, token in enumerate(piece):
                    batch.token[i] = token
                    batch.pos[i] = start + offset + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = all_logits or (last and i == len(piece) - 1)
                if lib.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                rows = len(piece) if all_logits else (1 if last else 0)
                if rows:
                    flat = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(rows * self.vocab,))
                    out.append(flat.reshape(rows, self.vocab).copy())
            finally:
                lib.llama_batch_free(batch)
        return np.concatenate(out)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [S, V] of every position of a fresh prompt."""
        self.reset()
        return self._decode([int(t) for t in ids], 0, True)

    def greedy(self, ids: np.ndarray, new: int) -> list[int]:
        self.reset()
        logits = self._decode([int(t) for t in ids], 0, False)
        tokens = [int(logits[-1].argmax())]
        for i in range(new - 1):
            logits = self._decode([tokens[-1]], len(ids) + i, False)
            tokens.append(int(logits[-1].argmax()))
        return tokens

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


_QUIET = None


def _bindings(peer: LlamaCpp):
    """llama-cpp-python's `llama_cpp.llama_cpp` ctypes module, loaded without the package's __init__
    (which pulls in the high-level API and its dependencies)."""
    global _QUIET
    import types
    if "llama_cpp.llama_cpp" not in sys.modules:
        package = types.ModuleType("llama_cpp")
        package.__path__ = [str(peer.source / "llama_cpp")]
        sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as lib
    if _QUIET is None:
        _QUIET = lib.llama_log_callback(lambda level, text, data: None)
    return lib


def file_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    peer = LlamaCpp.ensure()
    print(f"llama.cpp {LLAMA_CPP_COMMIT} (llama-cpp-python {VERSION}) built in {peer.bin}")
