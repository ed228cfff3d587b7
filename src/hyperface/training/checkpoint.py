"""Checkpoints: written atomically, loaded safely, resumed exactly; export to insightface formats.

Layout of a run folder::

    RUN/checkpoints/latest                    name of the newest *complete* checkpoint (text)
    RUN/checkpoints/step-000012000/
        backbone.safetensors                  iResNet weights, insightface key names (rank 0)
        head-rank{r}.safetensors              rank r's class-centre shard + margin state (AdaFace EMA)
        state-rank{r}.pt                      optimiser, grad scaler, RNG, step/epoch/position
                                              (plain tensors/containers: loads with weights_only=True)
        meta.json                             step, epoch, arch, world size, config (written last)

Every file is written to a temporary name and renamed; ``latest`` moves only after every rank has
written its files, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from hyperface.common.errors import HyperfaceError, exception_summary
from hyperface.common.io import atomic_path, atomic_write, load_safetensors, read_json, save_json

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, tmp, metadata=metadata)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise HyperfaceError(f"checkpoint file missing: {path}") from None
    except Exception as exc:
        raise HyperfaceError(f"cannot read {path} as a weights-only torch file ({exception_summary(exc)})") from exc


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (None when there is none)."""
    folder = Path(run_dir) / CHECKPOINTS
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    steps = sorted(p.name for p in folder.glob("step-*") if (p / "meta.json").is_file())
    if not name or any(c in name for c in "/\\\n"):
        hint = f"write {steps[-1]} into it (the newest checkpoint there)" if steps else f"delete {pointer} to start over"
        raise HyperfaceError(f"{pointer} is empty or damaged (it names the newest step-N folder): {hint}")
    path = folder / name
    if not (path / "meta.json").is_file():
        raise HyperfaceError(f"{pointer} names {name}, which is missing or incomplete; delete {pointer} to start over")
    return path


def previous_checkpoint(run_dir: str | os.PathLike, current: Path) -> Path | None:
    """The newest complete checkpoint older than ``current`` (None when pruning kept none)."""
    folder = Path(run_dir) / CHECKPOINTS
    older = sorted(p for p in folder.glob("step-*") if p.name < current.name and (p / "meta.json").is_file())
    return older[-1] if older else None


def publish_checkpoint(run_dir: str | os.PathLike, path: Path, meta: dict[str, Any], keep: int = 2) -> None:
    """Rank 0, after every rank wrote its files: meta.json, then move ``latest``, then prune."""
    save_json(path / "meta.json", meta)
    folder = Path(run_dir) / CHECKPOINTS
    with atomic_write(folder / LATEST, "w") as handle:
        handle.write(path.name + "\n")
    prune_checkpoints(folder, path, keep)


def prune_checkpoints(folder: Path, latest: Path, keep: int) -> None:
    """Keep ``latest`` and the newest ``keep - 1`` other complete step folders (``keep`` 0: all).
    A folder without meta.json is a save a kill cut short: never one of those kept, deleted here
    (its step is replayed). Each doomed one is renamed out of the ``step-*`` names first, so a kill
    mid-delete never leaves a partial folder that looks like a checkpoint; leftovers of such kills
    are deleted here."""
    for leftover in folder.glob(".deleting-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    others = [p for p in folder.glob("step-*") if p.is_dir() and p != latest]
    partial = [p for p in others if not (p / "meta.json").is_file()]
    steps = sorted(p for p in others if p not in partial)
    doomed_steps = steps[: max(0, len(steps) - (keep - 1))] if keep > 0 else []
    for old in partial + doomed_steps:
        doomed = old.with_name(f".deleting-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder, its checkpoints/ folder, a step-* folder, or a weights file -> that path."""
    path = Path(path)
    if not path.exists():
        raise HyperfaceError(f"checkpoint not found: {path}")
    if path.is_file() and path.name == LATEST and path.parent.name == CHECKPOINTS:
        path = path.parent  # the pointer file stands for its checkpoints/ folder
    if path.is_file():
        return path
    if (path / "meta.json").is_file():
        return path
    for run in (path, path.parent):
        found = latest_checkpoint(run) if (run / CHECKPOINTS).is_dir() else None
        if found is not None:
            return found
    if (path / LATEST).is_file():
        return latest_checkpoint(path.parent) or path
    raise HyperfaceError(
        f"{path} holds no checkpoint: give a training run folder (with checkpoints/latest), a "
        "checkpoints/step-* folder, backbone.safetensors or backbone.pth"
    )


def load_backbone_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state dict with insightface key names, meta) from any checkpoint form."""
    path = resolve_checkpoint(path)
    meta: dict[str, Any] = {}
    if path.is_dir():
        meta = read_json(path / "meta.json")
        path = path / "backbone.safetensors"
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    elif path.suffix in (".pth", ".pt"):
        state = load_torch(path)
        if not isinstance(state, dict):
            raise HyperfaceError(f"{path} is not a state dict")
    else:
        raise HyperfaceError(f"unsupported checkpoint file {path}: expected .safetensors or .pth")
    return state, meta


def load_backbone(path: str | os.PathLike):
    """Build the backbone of a checkpoint (iResNet or MobileFaceNet; arch from meta.json or inferred)
    and load it strictly."""
    from hyperface.recognition.backbones import backbone_from_state_dict

    state, meta = load_backbone_state(path)
    return backbone_from_state_dict(state, arch=meta.get("arch"))[0], meta


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int = 17) -> Path:
    """Export a trained backbone as insightface ``backbone.pth`` (state dict) or ONNX.

    - ``.pth`` (or ``.pt``, the same file): ``torch.save(model.state_dict())`` with insightface
      arcface_torch key names, so insightface's ``get_model(name).load_state_dict(torch.load(path))``
      loads it, and so does ``hyperface embed --model``.
    - ``.onnx``: input ``data`` float32 (N, 3, 112, 112) RGB normalised ``(x - 127.5) / 127.5``
      with a dynamic batch dimension, output ``embedding`` (N, 512) un-normalised, as
      arcface_torch's ``torch2onnx.py`` exports.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".pth", ".pt", ".onnx"):  # before the checkpoint loads
        raise HyperfaceError(f"--out {out}: export to a .pth or .pt (insightface state dict) or .onnx file")
    model, _ = load_backbone(checkpoint)
    model = model.eval().float().to(memory_format=torch.contiguous_format)
    if suffix in (".pth", ".pt"):
        save_torch({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out)
    else:
        dummy = torch.zeros(1, 3, 112, 112)
        # The TorchScript exporter (dynamo=False) needs no onnxscript and gives the plain graph
        # insightface tools expect; silence its deprecation notice.
        with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                tmp,
                dynamo=False,
                input_names=["data"],
                output_names=["embedding"],
                dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
    return out


__all__ = [
    "export_backbone",
    "latest_checkpoint",
    "load_backbone",
    "load_backbone_state",
    "load_safetensors",
    "load_torch",
    "prune_checkpoints",
    "publish_checkpoint",
    "resolve_checkpoint",
    "save_safetensors",
    "save_torch",
]
