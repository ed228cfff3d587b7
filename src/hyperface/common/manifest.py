"""manifest.json: what produced an output (parameters, versions, inputs, timings).

Every stage writes one beside its outputs, last, so a folder with a manifest whose ``status`` is
``"complete"`` is a finished run.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperface.common.io import describe_input, save_json


def environment_versions() -> dict[str, str]:
    """Versions of the things that change results."""
    import numpy

    import hyperface

    versions = {
        "hyperface": hyperface.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": numpy.__version__,
    }
    try:
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            versions["cuda"] = str(torch.version.cuda)
            versions["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    for name in ("onnxruntime", "diffusers", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def describe_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The settings that differ, for resume errors: ``"seed 0 -> 3, steps 100 -> 200"``.

    Nested dicts are compared key by key (``"config.seed 0 -> 3"``); a key on one side only shows
    as ``(unset)`` on the other.
    """
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key, _UNSET), after.get(key, _UNSET)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = describe_changes(old, new)
            changes += [f"{key}.{item}" for item in inner.split(", ")] if inner else []
        elif old != new:
            changes.append(f"{key} {_show(old)} -> {_show(new)}")
    return ", ".join(changes)


_UNSET = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else repr(value)


@dataclass
class Manifest:
    """Collects a run's facts; :meth:`write` stores them as ``manifest.json``."""

    stage: str
    params: dict[str, Any]
    inputs: dict[str, str | os.PathLike | dict[str, str] | None] = field(default_factory=dict)  # a dict: as described
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    command: str | None = None  # what made the output; default: this process's command line

    def time(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)

    def write(self, out_dir: str | os.PathLike, *, status: str = "complete", checksum_inputs: bool = True,
              name: str = "manifest.json") -> Path:
        """Write ``out_dir/name`` (atomically); ``name`` for outputs that are files beside others
        (``g.manifest.json`` beside ``g.npy``)."""
        path = Path(out_dir) / name
        inputs = {}
        for key, value in self.inputs.items():
            if value is None:
                continue
            if isinstance(value, dict):  # already described (describe_input): not hashed again
                inputs[key] = value
            else:
                inputs[key] = describe_input(value) if checksum_inputs else {"path": str(Path(value).resolve())}
        payload = {
            "stage": self.stage,
            "status": status,
            "command": self.command or " ".join(sys.argv),
            "started": _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc).isoformat(),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "wall_seconds": round(time.time() - self.started, 3),
            "params": self.params,
            "inputs": inputs,
            "timings": self.timings,
            "versions": environment_versions(),
            **self.extra,
        }
        save_json(path, payload)
        return path


def write_manifest(out_dir: str | os.PathLike, stage: str, params: dict[str, Any], **kwargs: Any) -> Path:
    """One-shot form of :class:`Manifest` for stages that need no timings."""
    return Manifest(stage=stage, params=params, **kwargs).write(out_dir)
