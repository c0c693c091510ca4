"""Compile a tiny Llama 4 (Scout's structure) with random weights, then generate with the runtime.

    python examples/generate_tiny.py [build-dir]

The same as `l4compile build specs/tiny-scout.yaml --weights random -o build/tiny-scout`
followed by `l4compile run build/tiny-scout --prompt-ids 1,2,3`, from Python.
"""

import sys
from pathlib import Path

import numpy as np

from l4compile.build import BuildOptions, build
from l4compile.runtime import Engine
from l4compile.spec import load_spec
from l4compile.weights import RandomWeights

ROOT = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/tiny-scout")

spec = load_spec(ROOT / "specs" / "tiny-scout.yaml")
build(spec, out, RandomWeights(seed=0), BuildOptions())

engine = Engine.load(out)                      # onnxruntime on the CPU
prompt = np.array([[1, 2, 3, 4]])
print("greedy:  ", engine.generate(prompt, max_new_tokens=20, stop_tokens=())[0].tolist())
print("sampled: ", list(engine.stream(prompt[0], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=1,
                                       stop_tokens=())))
print("logits of the prompt:", engine.logits(prompt).shape)
