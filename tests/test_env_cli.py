"""hyperface env: the machine's facts, as text and as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch

from hyperface.cli import main


def test_env_reports_versions_devices_and_optional_packages(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text
    assert ("CUDA available" in text) == torch.cuda.is_available()
    assert "diffusers" in text and "generate (Arc2Face)" in text
    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["torch"]["version"] == torch.__version__
    assert facts["packages"]["torch"] == torch.__version__  # the installed distribution is the one imported
    assert len(facts["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(facts["optional"]) >= {"onnxruntime", "diffusers", "transformers"}


def test_env_names_what_is_missing_and_how_to_add_it(monkeypatch, capsys):
    from hyperface.common import env_cli

    real = env_cli._version
    monkeypatch.setattr(env_cli, "_version", lambda name: None if name in ("diffusers", "onnxruntime") else real(name))
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "diffusers     not installed" in text
    assert "pip install 'hyperface[generation,recognition]'" in text and "pip install onnxruntime diffusers" in text


def test_a_closed_pipe_is_not_an_error(monkeypatch):
    from hyperface.common import env_cli

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(env_cli, "run", closed)
    saved = os.dup(sys.stdout.fileno())  # main points stdout at /dev/null: give the test its stdout back
    try:
        assert main(["env"]) == 0  # not the traceback an OSError without a file name gets
    finally:
        os.dup2(saved, sys.stdout.fileno())
        os.close(saved)
