"""Property-based: typed mutations of the shipped specs, through the CLI's main() in-process.

Whatever the mutation, the answer is exit 0, or exit 1/2 with one line that names the spec file (and,
for spec errors, `file:line: field:` where the field exists); never a traceback, never a leftover file, and
bounded memory: the peak of Python and numpy allocations (tracemalloc) stays under a fixed bound (the
shipped specs take ~7 MB for inspect and ~6 MB for a tiny dry run; a per-layer or per-element allocation of
an absurd size would take gigabytes). Time is bounded by the same sizes (no clock in tests).
"""

from __future__ import annotations

import math
import re
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4compile.cli import main
from tests.conftest import SPECS

SPEC_NAMES = sorted(p.stem for p in SPECS.glob("*.yaml"))
TINY = ("tiny-scout", "tiny-maverick")

# Values of every YAML type, around the boundaries that matter (0, negatives, int32, int64, non-finite).
INTS = st.one_of(st.integers(-2, 70), st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]))
FLOATS = st.one_of(st.sampled_from([0.0, -1.0, 1e-12, 1e308, math.inf, -math.inf, math.nan]),
                   st.floats(-1e6, 1e6))
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), st.none(),
                    st.sampled_from(["", "x", "../../x", "a\0b", "llama3", "1e-5", "null", "x" * 300,
                                     "x\ud800y", "a\x85\u2028b"]))   # a lone surrogate, line separators
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.sampled_from(["a", "type", "x"]),
                                                                          SCALARS, max_size=2))


def leaves(node, path=()):
    """Every (path, value) of a nested mapping, containers included."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, path + (i,))


def like(value):
    """A strategy of values of the same type as `value` (most mutations keep the type), or any value."""
    if isinstance(value, bool):
        return st.one_of(st.booleans(), VALUES)
    if isinstance(value, int):
        return st.one_of(INTS, INTS, VALUES)
    if isinstance(value, float):
        return st.one_of(FLOATS, FLOATS, VALUES)
    return VALUES


@st.composite
def mutated_spec(draw, names=SPEC_NAMES):
    name = draw(st.sampled_from(names))
    data = yaml.safe_load((SPECS / f"{name}.yaml").read_text())
    for _ in range(draw(st.integers(1, 3))):
        paths = [(path, value) for path, value in leaves(data) if path]
        path, value = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "num_layers", "chunk_size", "eos"]))] = draw(VALUES)
        else:
            parent[path[-1]] = draw(like(value))
        if not isinstance(data, dict):
            break
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def check_outcome(code, err, spec_file):
    assert code in (0, 1, 2), (code, err)
    if code == 0:
        assert err == "" or err.startswith("l4compile: "), err
        return
    assert err.count("\n") == 1 and err.startswith("l4compile: error: "), err
    assert "Traceback" not in err
    if code == 2:
        assert re.match(rf"l4compile: error: {re.escape(str(spec_file))}(:\d+)?: ", err), err


INSPECT_PEAK_BYTES = 64 << 20
DRY_RUN_PEAK_BYTES = 256 << 20


def bounded(argv: list[str], peak_bytes: int) -> int:
    """main(argv), asserting the peak of the memory it allocates through Python and numpy."""
    tracemalloc.start()
    try:
        code = main(argv)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= peak_bytes, f"{argv[0]} allocated {peak / 2**20:.0f} MiB at its peak"
    return code


FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(FUZZ, max_examples=80)
@given(text=mutated_spec())
def test_inspect_any_mutation(text, tmp_path_factory, capsys):
    work = tmp_path_factory.mktemp("fuzz")
    spec_file = work / "spec.yaml"
    spec_file.write_text(text)
    code = bounded(["inspect", str(spec_file), "--json", "--context", "100000"], INSPECT_PEAK_BYTES)
    check_outcome(code, capsys.readouterr().err, spec_file)
    assert [p.name for p in work.iterdir()] == ["spec.yaml"]


@settings(FUZZ, max_examples=12)
@given(text=mutated_spec(TINY))
def test_dry_run_any_mutation_of_the_tiny_specs(text, tmp_path_factory, capsys, monkeypatch):
    work = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(work)
    spec_file = work / "spec.yaml"
    spec_file.write_text(text)
    code = bounded(["build", str(spec_file), "--dry-run", "-q"], DRY_RUN_PEAK_BYTES)
    captured = capsys.readouterr()
    check_outcome(code, captured.err, spec_file)
    assert [p.name for p in work.iterdir()] == ["spec.yaml"]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_shipped_specs_pass_unchanged(name, capsys):
    assert main(["inspect", str(SPECS / f"{name}.yaml")]) == 0
