"""Issue 9: a build never loses a user's files, never escapes build/, and leaves no temporaries behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from l4compile.build import BuildOptions, build
from l4compile.cli import main
from l4compile.errors import BuildError
from l4compile.outdir import check_replaceable, default_output, remove_stale, replace_dir
from l4compile.runtime import integrity
from l4compile.runtime.manifest import Manifest
from l4compile.weights import RandomWeights
from tests.conftest import load, spec_path

TINY = str(spec_path("tiny-scout"))


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and "Traceback" not in text


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_directory_with_a_foreign_manifest_is_not_replaced(tmp_path, capsys):
    """The issue's repro: `{}` as manifest.json and a notes file; the build must refuse and keep both."""
    out = tmp_path / "v"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("keep")
    assert main(["build", TINY, "--weights", "random", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and str(out) in err and "--force" in err and "not an l4compile build" in err
    assert (out / "notes.txt").read_text() == "keep" and (out / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_a_build_with_extra_files_is_not_replaced_without_force(built_tiny, tmp_path, capsys):
    out = tmp_path / "b"
    build(load("tiny-scout"), out, RandomWeights(0), BuildOptions(), log=lambda _: None)
    (out / "notes.txt").write_text("keep")
    assert main(["build", TINY, "--weights", "random", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "notes.txt" in err and "--force" in err
    assert (out / "notes.txt").exists()
    assert main(["build", TINY, "--weights", "random", "--seed", "1", "-o", str(out), "--force"]) == 0
    err = capsys.readouterr().err
    assert "--force" in err and "deleting notes.txt" in err
    assert not (out / "notes.txt").exists() and "seed 1" in Manifest.read(out).weights


def test_an_older_build_is_replaced_with_one_line(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["build", TINY, "--weights", "random", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["build", TINY, "--weights", "random", "--seed", "3", "-o", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert err == f"l4compile: replacing the older build at {out}\n"
    assert "seed 3" in Manifest.read(out).weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_replaceable_rules(tmp_path):
    assert check_replaceable(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()   # not a build either: it may be a mount point, or someone's
    with pytest.raises(BuildError, match="it is empty"):
        check_replaceable(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="is not a directory.*--force"):
        check_replaceable(tmp_path / "file")
    assert "--force" in check_replaceable(tmp_path / "file", force=True)
    old = tmp_path / "old"   # a build from before checksums: its roles' files only
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "l4compile-build", "files": {"model": "m.onnx"}}))
    (old / "m.onnx").write_text("x")
    assert check_replaceable(old) == f"replacing the older build at {old}"
    (old / "sub").mkdir()
    with pytest.raises(BuildError, match="sub"):
        check_replaceable(old)


@pytest.mark.parametrize("output", [".", "..", "/", "absent/..", "../work", "../work/../work"])
def test_the_working_directory_and_nameless_outputs_are_never_replaced(output, built_tiny, tmp_path, monkeypatch,
                                                                       capsys):
    """`-o .` (or a path to the working directory or above it) is refused even with --force: the swap would
    delete the user's files and leave the shell in a deleted directory. `absent/..` must not be checked as
    absent, then swapped once the staging has created `absent`."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    for command in (["build", TINY, "--weights", "random", "-o", output, "--force"],
                    ["export-hf", str(built_tiny("tiny-scout")), "-o", output]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert one_line(err) and (" is the current directory" in err or "must end in a name" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert [p.name for p in work.iterdir()] == ["notes.txt"] and (work / "notes.txt").read_text() == "keep"


def test_a_build_directory_has_the_permissions_of_mkdir(tmp_path):
    """The staging directory comes from mkdtemp (mode 0700); the build it becomes must be readable by others
    as any directory the user makes is (a server running as another user reads it)."""
    build(load("tiny-scout"), tmp_path / "b", RandomWeights(0), BuildOptions(), log=lambda _: None)
    (tmp_path / "made").mkdir()
    assert (tmp_path / "b").stat().st_mode == (tmp_path / "made").stat().st_mode


@pytest.mark.parametrize("name, reason", [
    ("../../escaped", "path separator"), ("a/b", "path separator"), ("..", "starts with '.'"),
    (".hidden", "starts with '.'"), ("a\\0b", "control characters"), ("x" * 300, "longer than 200 bytes"),
])
def test_spec_names_cannot_escape_build(name, reason, tmp_path, monkeypatch, capsys):
    text = spec_path("tiny-scout").read_text().replace("name: tiny-scout", f'name: "{name}"')
    (tmp_path / "spec.yaml").write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for extra in ([], ["--dry-run"]):
        code = main(["build", str(tmp_path / "spec.yaml"), "--weights", "random", *extra])
        err = capsys.readouterr().err
        assert code == 1 and one_line(err) and reason in err and "-o DIR" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml", "work"] and not list(work.iterdir())
    with pytest.raises(BuildError, match="pass -o DIR"):
        default_output(name)


@pytest.mark.parametrize("field", ["name", "description"])
def test_a_lone_surrogate_in_a_spec_string_is_a_spec_error(field, tmp_path, monkeypatch, capsys):
    """YAML's "\\ud800" escape reads as a lone surrogate, which no directory name or ONNX string can hold."""
    text = spec_path("tiny-scout").read_text().replace(f"{field}:", f'{field}: "x\\ud800y"\nunused_{field}:', 1)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("unused_"))
    (tmp_path / "spec.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--dry-run"]):
        code = main(["build", str(tmp_path / "spec.yaml"), "--weights", "random", *extra])
        err = capsys.readouterr().err
        assert code == 2 and one_line(err) and "spec.yaml:" in err and f"{field}: expected" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["spec.yaml"]


def test_default_output_is_under_build(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:   # -o "$UNSET": not the default output
        main(["build", TINY, "--weights", "random", "-o", ""])
    assert exit.value.code == 2 and one_line(capsys.readouterr().err) and not list(tmp_path.iterdir())
    assert main(["build", TINY, "--weights", "random"]) == 0
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["tiny-scout"]


@pytest.mark.parametrize("case", ["file-in-the-way", "too-long", "unwritable"])
def test_output_paths_that_cannot_be_created(case, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = {"file-in-the-way": tmp_path / "afile" / "b", "too-long": tmp_path / ("a" * 300),
           "unwritable": "/proc/l4compile-cannot-write-here"}[case]
    assert main(["build", TINY, "--weights", "random", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and err.startswith("l4compile: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_import_hf_into_an_existing_directory(tmp_path, capsys):
    from l4compile.hf.export import hf_config_from_spec
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_spec(load("tiny-scout"), "float32")))
    (tmp_path / "specs").mkdir()
    assert main(["import-hf", str(tmp_path), "-o", str(tmp_path / "specs")]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "is a directory" in err and list((tmp_path / "specs").iterdir()) == []


def test_import_hf_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    """A hand-written spec (or any file) at -o is kept unless --force; a spec import-hf wrote is replaced with
    one line. The file is written beside and renamed, with a normal file's permissions."""
    from l4compile.hf.export import hf_config_from_spec
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_spec(load("tiny-scout"), "float32")))
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: my hand-written spec\n")
    assert main(["import-hf", str(tmp_path), "-o", str(mine)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "not a spec import-hf wrote" in err and "--force" in err
    assert mine.read_text() == "name: my hand-written spec\n"
    ours = tmp_path / "ours.yaml"
    assert main(["import-hf", str(tmp_path), "-o", str(ours)]) == 0 and capsys.readouterr().err == ""
    assert main(["import-hf", str(tmp_path), "-o", str(ours), "--name", "again"]) == 0
    assert capsys.readouterr().err == f"l4compile: replacing the spec import-hf wrote at {ours}\n"
    assert "name: again" in ours.read_text()
    assert main(["import-hf", str(tmp_path), "-o", str(mine), "--force"]) == 0
    assert "--force" in capsys.readouterr().err and "import-hf" in mine.read_text().splitlines()[0]
    (tmp_path / "made").write_text("")
    assert ours.stat().st_mode == (tmp_path / "made").stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "made", "mine.yaml", "ours.yaml"]


@pytest.mark.parametrize("name", ["x\udcffy", "a\tb", " "])
def test_import_hf_refuses_names_no_spec_can_hold(name, tmp_path, capsys):
    """A command-line byte that is not UTF-8 arrives as a lone surrogate: the spec written would not load."""
    from l4compile.hf.export import hf_config_from_spec
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_spec(load("tiny-scout"), "float32")))
    assert main(["import-hf", str(tmp_path), "--name", name, "-o", str(tmp_path / "s.yaml")]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "--name" in err and not (tmp_path / "s.yaml").exists()


def test_stale_temporaries_of_dead_builds_are_removed(tmp_path):
    dead, live = dead_pid(), os.getpid()
    stale = tmp_path / f".b.tmp-{dead}-abc_1234"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"\0" * 1000)
    mine = tmp_path / f".b.tmp-{live}-xyz_5678"   # a live build's
    mine.mkdir()
    other = tmp_path / ".notes.tmp-old"   # not ours: no pid in the name
    other.mkdir()
    users = tmp_path / f".notes.tmp-{dead}-mine"   # not ours either: mkdtemp's suffixes have 8 characters
    users.mkdir()
    build(load("tiny-scout"), tmp_path / "b", RandomWeights(0), BuildOptions(), log=lambda _: None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["b", mine.name, other.name, users.name])


def test_a_swap_interrupted_between_renames_is_undone(tmp_path):
    """Where no atomic exchange exists the old build is renamed aside first; a build killed right then
    leaves `.NAME.old-PID-0`, which the next build puts back before anything else."""
    old = tmp_path / f".b.old-{dead_pid()}-0"
    build(load("tiny-scout"), old, RandomWeights(0), BuildOptions(), log=lambda _: None)
    assert remove_stale(tmp_path) == [] and (tmp_path / "b" / "manifest.json").is_file()
    new = tmp_path / "new"
    build(load("tiny-scout"), new, RandomWeights(1), BuildOptions(), log=lambda _: None)
    import l4compile.outdir as outdir
    outdir._RENAMEAT2[:] = [None]   # the fallback path
    try:
        replace_dir(new, tmp_path / "b")
    finally:
        outdir._RENAMEAT2.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and "seed 1" in Manifest.read(tmp_path / "b").weights


def test_closed_stdout_exits_quietly():
    command = f"{sys.executable} -m l4compile.cli inspect {spec_path('scout')} | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    assert r.stdout.startswith("scout") and r.stdout.count("\n") == 1
    assert r.stderr == "" and r.returncode in (0, 141)   # 0 if everything fit in the pipe before head exited


def test_broken_pipe_is_quiet_in_process(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", str(spec_path("scout"))]) == 141
    assert capsys.readouterr().err == ""


# ---- kill tests -----------------------------------------------------------------------------------

def _state(out) -> str:
    """'absent', or the seed of the complete, verified build at `out`."""
    if not out.exists():
        return "absent"
    manifest = Manifest.read(out)
    integrity.check(out, manifest.checksums, manifest.files, checksums=True)
    return manifest.weights


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_killed_builds_leave_the_old_or_the_new_build(signal_name, tmp_path):
    """Kill builds at random moments (bounded: 3 per signal): once at any time, twice while the build
    is writing (after its temporary directory appears, when data loss could happen). After each, the
    output is the previous complete build or the new one; the next build leaves no temporaries."""
    import random
    import signal as signals
    import time
    rng = random.Random(9 if signal_name == "SIGTERM" else 10)
    out = tmp_path / "b"
    seen = {"absent"}
    for trial in range(3):
        before = _state(out)
        args = [sys.executable, "-m", "l4compile.cli", "build", TINY, "--weights", "random", "--seed",
                str(trial + 1), "-o", str(out)]
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if trial == 0:
            time.sleep(rng.uniform(0.2, 3.0))
        else:
            deadline = time.monotonic() + 60
            while (not list(tmp_path.glob(f".b.tmp-{child.pid}-*")) and child.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.6) if trial == 1 else rng.uniform(0.5, 1.2))   # writing takes ~1 s
        child.send_signal(getattr(signals, signal_name))
        err = child.communicate(timeout=60)[1]
        after = _state(out)
        assert after in (before, f"random (seed {trial + 1})"), (before, after)
        seen.add(after)
        if signal_name == "SIGTERM" and child.returncode == 143:
            assert err.endswith("l4compile: terminated\n") and "Traceback" not in err
        else:
            assert child.returncode in (0, -signals.SIGTERM, -signals.SIGKILL), err
        if signal_name == "SIGTERM":   # the handler cleans up at once
            assert not [p for p in tmp_path.iterdir() if p.name != "b"]
    r = subprocess.run([sys.executable, "-m", "l4compile.cli", "build", TINY, "--weights", "random", "-o",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _state(out) == "random (seed 0)"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_a_sharded_build_is_replaced_like_any_build(tmp_path, capsys):
    """build --tp N writes rank_K/ folders: they are the build's own (recorded in the top manifest)."""
    from l4compile.shard.build import build_sharded
    out = tmp_path / "tp2"
    options = BuildOptions(target="trt", tp=2)
    build_sharded(load("tiny-maverick"), out, RandomWeights(0), options, None, lambda _: None)
    manifest = Manifest.read(out)
    assert "rank_0/model.onnx.data" in manifest.checksums and "rank_1/manifest.json" in manifest.checksums
    assert main(["verify", str(out)]) == 0
    assert main(["verify", str(out / "rank_1")]) == 1   # its files are in the top manifest's records
    assert f"run: l4compile verify {out}\n" in capsys.readouterr().err
    build_sharded(load("tiny-maverick"), out, RandomWeights(1), options, None, lambda _: None)
    assert f"replacing the older build at {out}" in capsys.readouterr().err
    (out / "rank_1" / "notes.txt").write_text("keep")
    with pytest.raises(BuildError, match=r"rank_1/notes\.txt.*--force"):
        build_sharded(load("tiny-maverick"), out, RandomWeights(0), options, None, lambda _: None)
    assert (out / "rank_1" / "notes.txt").exists()
