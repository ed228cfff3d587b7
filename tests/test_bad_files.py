"""Damaged or hostile files met by several stages: one clear line each, nothing executed."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from generation_fixtures import random_identities, session_tiny_models

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError, exception_summary


class _RunsCode:
    """Unpickling this would create the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_exception_summary_is_one_clean_line():
    assert exception_summary(KeyError()) == "KeyError"  # no message: the type, not an IndexError
    assert "truncated" in exception_summary(EOFError()) and "truncated" in exception_summary(EOFError("Ran out of input"))
    assert "more memory than this machine has" in exception_summary(MemoryError())
    miniz = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal miniz error.")
    assert exception_summary(miniz).startswith("it is truncated or damaged")
    long_line = "First sentence is here. " + "word " * 100
    assert exception_summary(RuntimeError(long_line), 60) == "First sentence is here."  # cut at a sentence end
    assert exception_summary(RuntimeError("word " * 100), 30).endswith("…") and len(exception_summary(RuntimeError("word " * 100), 30)) <= 30
    assert exception_summary(RuntimeError("\x1b[1mbold\x1b[0m first\nsecond")) == "bold first"
    assert exception_summary(ValueError("bad <_io.BytesIO object at 0x7f00ab> data")) == "bad data"
    refused = exception_summary(pickle.UnpicklingError("Weights only load failed. ... weights_only=False ..."))
    assert "refusing to unpickle" in refused and "weights_only=False" not in refused


def test_an_empty_weights_file_is_one_line(tmp_path, capsys):
    empty = tmp_path / "backbone.pth"
    empty.touch()
    from recognition_fixtures import random_faces
    from verification_fixtures import write_verification_bin

    write_verification_bin(tmp_path / "lfw.bin", random_faces(4), [True, False])
    assert main(["evaluate", str(empty), str(tmp_path / "lfw.bin"), "--folds", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "backbone.pth" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_hostile_or_broken_arc2face_folder_is_refused_in_one_line(tmp_path, capsys):
    models = session_tiny_models()
    arc2face, sd15 = tmp_path / "Arc2Face", tmp_path / "sd15"
    shutil.copytree(models.arc2face_dir, arc2face)
    shutil.copytree(models.sd15_dir, sd15)
    np.save(tmp_path / "ids.npy", random_identities(2))
    marker = tmp_path / "code-ran"
    torch.save({"text_model.x": _RunsCode(marker)}, arc2face / "encoder" / "pytorch_model.bin")
    argv = ["generate", str(tmp_path / "ids.npy"), "--arc2face", str(arc2face), "--sd15", str(sd15),
            "--steps", "1", "--resolution", "32", "--device", "cpu", "-k", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "weights_only=False" not in err and "Traceback" not in err
    assert not marker.exists()

    shutil.copy(models.arc2face_dir / "encoder" / "pytorch_model.bin", arc2face / "encoder" / "pytorch_model.bin")
    (sd15 / "tokenizer" / "vocab.json").write_text("")  # tokenizers raises a bare Exception here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the tokenizer in" in err and "stable-diffusion-v1-5" in err and "Traceback" not in err


def test_a_foreign_pack_checkpoint_is_refused(tmp_path):
    from hyperface.packing import PackConfig, pack

    torch.save({"something": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(HyperfaceError, match="not a hyperface pack checkpoint"):
        pack(PackConfig(10, 4, steps=5), checkpoint_dir=tmp_path, resume=True)
