"""Output folders: a failed attempt never blocks the corrected command; results are never lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import RUN_MARKER, prepare_output_dir


def test_a_folder_left_by_a_failed_attempt_is_reused(tmp_path):
    out = prepare_output_dir(tmp_path / "run", stage="generate", setup_files=("run.json",))
    (out / "run.json").write_text("{}")  # settings written, then the attempt failed on bad input
    (out / "parts" / "shard-0").mkdir(parents=True)
    (out / "parts" / "shard-0" / "journal.jsonl").touch()  # empty: no work in it
    again = prepare_output_dir(out, stage="generate", setup_files=("run.json",))
    assert sorted(p.name for p in again.iterdir()) == [RUN_MARKER]


def test_a_folder_holding_results_still_needs_resume_or_overwrite(tmp_path):
    out = prepare_output_dir(tmp_path / "run", stage="train", setup_files=("config.json",))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(HyperfaceError, match="--resume"):
        prepare_output_dir(out, stage="train", setup_files=("config.json",))
    assert (out / "metrics.jsonl").exists()
    assert prepare_output_dir(out, resume=True) == out and (out / "metrics.jsonl").exists()
    prepare_output_dir(out, overwrite=True)
    assert not (out / "metrics.jsonl").exists()


def test_folders_hyperface_did_not_write_are_never_cleared(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "run.json").write_text("{}")  # a setup file name, but no run marker
    with pytest.raises(HyperfaceError, match="not empty"):
        prepare_output_dir(foreign, setup_files=("run.json",))
    with pytest.raises(HyperfaceError, match="did not write"):
        prepare_output_dir(foreign, overwrite=True)
    assert (foreign / "run.json").exists()


def test_another_stages_folder_is_never_overwritten_or_resumed_into(tmp_path):
    data = prepare_output_dir(tmp_path / "gen", stage="generate", setup_files=("run.json",))
    (data / "rec").mkdir()
    (data / "rec" / "train.rec").write_bytes(b"finished work")
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(HyperfaceError, match="holds a `hyperface generate` run") as error:
            prepare_output_dir(data, stage="pack", **flags)
        assert "--overwrite to replace" not in str(error.value)  # no advice that would be refused
    assert (data / "rec" / "train.rec").read_bytes() == b"finished work"
    assert prepare_output_dir(data, stage="generate", resume=True) == data  # its own stage may


def test_an_embed_folder_is_named_as_such(tmp_path):
    """embed writes no run marker; its manifest says whose folder it is, and nothing is cleared."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "gallery.npy").write_bytes(b"work")
    (gallery / "manifest.json").write_text('{"stage": "embed", "status": "complete"}')
    for flags in ({"overwrite": True}, {}):
        with pytest.raises(HyperfaceError, match="holds a `hyperface embed` run, not a pack run"):
            prepare_output_dir(gallery, stage="pack", **flags)
    assert (gallery / "gallery.npy").read_bytes() == b"work"
    (gallery / "manifest.json").write_text('{"stage": "something else"}')  # not ours: the general refusal
    with pytest.raises(HyperfaceError, match="did not write"):
        prepare_output_dir(gallery, stage="pack", overwrite=True)


def test_stages_without_resume_do_not_suggest_it(tmp_path):
    out = prepare_output_dir(tmp_path / "report", stage="report", resumable=False)
    (out / "report.json").write_text("{}")
    with pytest.raises(HyperfaceError) as error:
        prepare_output_dir(out, stage="report", resumable=False)
    assert "--resume" not in str(error.value) and "--overwrite" in str(error.value)


def test_cli_turns_path_errors_into_one_line_errors(monkeypatch, capsys):
    import argparse

    from hyperface import cli

    def fails(args):
        raise IsADirectoryError(21, "Is a directory", "runs/adir")

    def buggy(args):
        raise OSError("an internal failure with no path")

    parser = argparse.ArgumentParser(prog="hyperface report")  # as a stage's parser names itself
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=fails, stage="report")
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == "hyperface report: error: Is a directory: runs/adir"
    parser.set_defaults(func=buggy)
    with pytest.raises(OSError, match="internal failure"):  # a bug keeps its traceback
        cli.main([])


def test_describe_changes_names_only_what_differs():
    from hyperface.common.manifest import describe_changes

    before = {"seed": 0, "steps": 100, "config": {"lr": 0.1, "batch": 8}}
    after = {"seed": 3, "steps": 100, "config": {"lr": 0.1, "batch": 16}, "extra": True}
    assert describe_changes(before, after) == "config.batch 8 -> 16, extra (unset) -> True, seed 0 -> 3"
    assert describe_changes(before, dict(before)) == ""


def test_remove_stale_temporaries_takes_only_its_own_names(tmp_path):
    from hyperface.common.io import atomic_path, remove_stale_temporaries

    class Killed(Exception):
        pass

    for name in ("g1.npy", "g2.npy"):
        try:
            with atomic_path(tmp_path / name) as tmp:
                Path(tmp).write_bytes(b"half")
                os.link(tmp, tmp + ".kept")  # what a SIGKILL leaves: the cleanup below never runs
                raise Killed
        except Killed:
            os.replace(tmp + ".kept", tmp)
    (tmp_path / ".hidden").write_text("not ours")
    (tmp_path / "g1.npy").write_bytes(b"finished")
    assert len(list(tmp_path.glob(".*.tmp"))) == 2
    assert remove_stale_temporaries(tmp_path, ["g1.npy"]) == 1  # a gallery's own names only
    assert [p.name.startswith(".g2.npy.") for p in tmp_path.glob(".*.tmp")] == [True]
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "g1.npy"]


def test_embeddings_with_huge_or_tiny_finite_values_are_normalised_not_zeroed():
    import numpy as np

    from hyperface.common.io import validate_embeddings

    rows = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    expected = validate_embeddings(rows)
    for scale in (1e30, 1e-30):  # float32 norms overflow / underflow here, the values do not
        scaled = rows * np.float32(scale)
        assert np.isfinite(scaled).all()
        np.testing.assert_allclose(validate_embeddings(scaled), expected, atol=1e-6)
        with pytest.raises(HyperfaceError, match="unit-norm"):
            validate_embeddings(scaled, require_unit=True)
    mixed = rows.copy()
    mixed[2] *= np.float32(1e30)
    assert np.array_equal(np.delete(validate_embeddings(mixed), 2, 0), np.delete(expected, 2, 0))  # others bit-identical
    with pytest.raises(HyperfaceError, match=r"all-zero row\(s\), e.g. rows \[3\]"):
        validate_embeddings(np.where(np.arange(6)[:, None] == 3, 0, rows).astype(np.float32))


def test_without_a_terminal_progress_becomes_periodic_log_lines(monkeypatch, hyperface_log):
    import time

    from hyperface.common.runtime import progress

    records = hyperface_log
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    monkeypatch.delenv("HYPERFACE_PROGRESS", raising=False)
    monkeypatch.setenv("HYPERFACE_PROGRESS_SECONDS", "0.05")
    bar = progress(total=6, desc="generate 0/1", unit="img")
    for _ in range(6):
        time.sleep(0.03)
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in records]
    assert lines and all(line.startswith("generate 0/1: ") and "left" in line for line in lines)
    assert lines[-1].startswith("generate 0/1: 6/6 img (100%)") and "\r" not in "".join(lines)
    assert len(lines) == len({line.split(",")[0] for line in lines})  # the closing refresh is not repeated
    records.clear()
    for _ in progress(iter(range(3)), desc="stream", unit="rec"):  # no total: no percentage, no time left
        time.sleep(0.06)
    assert records and all(r.getMessage().startswith("stream: ") and "left" not in r.getMessage() for r in records)
    records.clear()
    from hyperface.packing.solver import budget_progress

    bar = budget_progress(None, 0.3, 0.0, desc="pack")  # a time budget: the caller's counter, no bar
    for _ in range(3):
        time.sleep(0.06)
        bar.update(0.1)
    bar.close()
    assert records and all(r.getMessage().startswith("pack: ") and "/0.3 s" in r.getMessage() for r in records)
    assert not any("|" in r.getMessage() for r in records)
    records.clear()
    monkeypatch.setenv("HYPERFACE_PROGRESS_SECONDS", "soon")
    for _ in progress(range(2), desc="bad"):
        pass
    assert any("not a number of seconds" in r.getMessage() for r in records)
    records.clear()
    monkeypatch.setenv("HYPERFACE_PROGRESS", "0")  # explicitly quiet: no bar, no lines
    for _ in progress(range(3), desc="quiet"):
        time.sleep(0.06)
    assert records == []


def test_unit_float32_embeddings_can_stay_on_disk(tmp_path):
    import numpy as np

    from hyperface.common.io import load_embeddings

    rows = np.random.default_rng(0).normal(size=(50, 8))
    unit = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    np.save(tmp_path / "unit.npy", unit)
    mapped = load_embeddings(tmp_path / "unit.npy", mapped=True)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, unit)  # no copy, same values
    assert not isinstance(load_embeddings(tmp_path / "unit.npy"), np.memmap)  # only when asked
    for name, array in {"scaled": unit * 2, "wide": unit.astype(np.float64)}.items():
        np.save(tmp_path / f"{name}.npy", array)
        loaded = load_embeddings(tmp_path / f"{name}.npy", mapped=True)
        assert not isinstance(loaded, np.memmap) and loaded.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(loaded, axis=1), 1.0, atol=1e-6)
    unit[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", unit)
    with pytest.raises(HyperfaceError, match=r"NaN/inf in 1 row\(s\), e.g. rows \[7\]"):
        load_embeddings(tmp_path / "nan.npy", mapped=True)


def test_content_hashes_are_pinned_and_name_sensitive(tmp_path):
    import hashlib

    import numpy as np

    from hyperface.common.io import array_sha256, files_sha256

    # generate's run.json stores this value: it must stay the formula earlier runs were checked with
    array = np.random.default_rng(0).normal(size=(70_000, 3)).astype(np.float64)  # more than one block
    old = hashlib.sha256(repr(array.shape).encode())
    for start in range(0, len(array), 65536):
        old.update(np.ascontiguousarray(array[start : start + 65536], dtype=np.float32).tobytes())
    assert array_sha256(array) == old.hexdigest()

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    (tmp_path / "a" / "model.bin").write_bytes(b"weights")
    files = [tmp_path / "a" / "config.json", tmp_path / "a" / "model.bin"]
    digest = files_sha256(files, tmp_path)
    assert files_sha256(list(reversed(files)), tmp_path) == digest  # order-free
    (tmp_path / "a" / "model.bin").rename(tmp_path / "a" / "other.bin")
    assert files_sha256([files[0], tmp_path / "a" / "other.bin"], tmp_path) != digest  # names count


def test_an_output_file_in_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    from hyperface.common.io import check_output_file

    check_output_file(tmp_path / "new" / "deeper" / "r.json", "--json")  # missing folders are fine
    def refused(*args, **kwargs):  # as in a read-only folder (tests may run as root, where chmod does not bite)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refused)
    with pytest.raises(HyperfaceError, match=r"--json .*r.json: cannot write in .* \(Permission denied\)"):
        check_output_file(tmp_path / "r.json", "--json")
    assert list(tmp_path.glob(".hyperface-probe-*")) == []


def test_help_wraps_prose_and_keeps_examples_as_written(monkeypatch, capsys):
    from hyperface.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # after the usage block
    assert description.startswith("Render K images") and all(len(line) <= 80 for line in description.splitlines())
    assert len(description.splitlines()) > 1
    assert "\n  hyperface generate --merge --out data/hf10k\n" in text  # an example line, untouched


def test_read_json_names_a_damaged_file(tmp_path):
    from hyperface.common.errors import HyperfaceError
    from hyperface.common.io import read_json

    for name, text, message in (("cut.json", '{"stage": "pa', "not valid JSON"), ("empty.json", "", "not valid JSON"),
                                ("list.json", "[1]", "holds a JSON list, not an object"), ("bytes.json", b"\xff\xfe{", "not valid JSON")):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(HyperfaceError, match=message) as info:
            read_json(path)
        assert str(path) in str(info.value) and "delete it and rerun" in str(info.value)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json") == {"a": 1}
    with pytest.raises(FileNotFoundError):  # callers test for a missing file themselves
        read_json(tmp_path / "missing.json")


def test_a_failed_write_names_the_file_asked_for_not_its_temporary(tmp_path):
    import errno

    from hyperface.common.io import atomic_path

    target = tmp_path / "backbone.onnx"
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
    assert info.value.filename == str(target) and info.value.errno == errno.ENOSPC
    with pytest.raises(HyperfaceError, match="cannot write .*backbone.onnx: file write failed") as info:
        with atomic_path(target) as tmp:
            raise RuntimeError(f"[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file {tmp}: file write failed")
    assert ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary left, nothing half-written



def test_resume_never_claims_a_folder_hyperface_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    with pytest.raises(HyperfaceError, match="cannot --resume in .*mine: it holds files hyperface did not write"):
        prepare_output_dir(mine, resume=True, stage="convert")
    assert not (mine / RUN_MARKER).exists()  # not claimed, so a later --overwrite still refuses
    with pytest.raises(HyperfaceError, match="refusing to --overwrite"):
        prepare_output_dir(mine, overwrite=True, stage="convert")
    assert (mine / "keep.txt").read_text() == "precious"


def test_an_output_link_works_in_the_folder_it_names(tmp_path):
    real = prepare_output_dir(tmp_path / "real", stage="convert")
    (real / "result.txt").write_text("old")
    (tmp_path / "link").symlink_to(real)
    out = prepare_output_dir(tmp_path / "link", overwrite=True, stage="convert")
    assert out == real.resolve() and (tmp_path / "link").is_symlink() and not (real / "result.txt").exists()


def test_safetensors_reader_round_trips_and_names_a_damaged_or_missing_file(tmp_path):
    import torch

    from hyperface.common.io import load_safetensors
    from hyperface.training.checkpoint import save_safetensors

    path = tmp_path / "weights.safetensors"
    save_safetensors({"w": torch.arange(6.0).reshape(2, 3)}, path)
    assert torch.equal(load_safetensors(path)["w"], torch.arange(6.0).reshape(2, 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8])  # a copy cut short
    with pytest.raises(HyperfaceError, match=r"weights\.safetensors as a safetensors file .*: fetch it again"):
        load_safetensors(path, hint="fetch it again")
    with pytest.raises(HyperfaceError, match="file not found: .*missing.safetensors"):
        load_safetensors(tmp_path / "missing.safetensors")


_HOLD_FOLDER = """
import sys, time
from hyperface.common.io import prepare_output_dir
prepare_output_dir(sys.argv[1], stage="pack", resume=True)
print("holding", flush=True)
time.sleep(120)
"""


def test_a_folder_another_process_is_writing_into_is_refused_and_kept(tmp_path):
    """The same command started twice (a requeued job while the first still runs): the second is
    refused, --overwrite included, and deletes nothing; once the first process ends (a kill too),
    the folder is free."""
    import subprocess
    import sys

    out = prepare_output_dir(tmp_path / "run", stage="pack", exclusive=False)
    (out / "checkpoint.pt").write_bytes(b"work")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_FOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(HyperfaceError, match="another process is writing into .*run now"):
                prepare_output_dir(out, stage="pack", **flags)
        assert (out / "checkpoint.pt").read_bytes() == b"work"
    finally:
        holder.kill()
        holder.wait()
    assert prepare_output_dir(out, stage="pack", resume=True) == out  # the kernel dropped the dead holder's lock


def test_a_stage_lets_go_of_its_folder_when_it_returns(tmp_path):
    import subprocess
    import sys

    from hyperface.common.io import releases_output_locks

    @releases_output_locks
    def stage(fail: bool) -> None:
        prepare_output_dir(tmp_path / "run", stage="pack", resume=True)
        if fail:
            raise HyperfaceError("bad input")

    check = [sys.executable, "-c", "import sys; from hyperface.common.io import prepare_output_dir; "
             "prepare_output_dir(sys.argv[1], stage='pack', resume=True)", str(tmp_path / "run")]
    prepare_output_dir(tmp_path / "run", stage="pack")  # held by this process, outside any stage
    assert subprocess.run(check, capture_output=True, text=True).returncode != 0
    from hyperface.common import io as common_io

    assert common_io.holds_lock(tmp_path / "run" / RUN_MARKER)
    common_io.release_lock(tmp_path / "run" / RUN_MARKER)
    stage(False)
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    with pytest.raises(HyperfaceError, match="bad input"):
        stage(True)
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
