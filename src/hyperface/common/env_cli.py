"""``hyperface env``: what this machine offers hyperface (versions, devices, optional packages), the
block to paste into a bug report, and a quick answer to "why does generate say diffusers is missing?"."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

#: Optional packages and the stages that need them (the rest are hard dependencies).
OPTIONAL = {
    "onnxruntime": "embed/evaluate with .onnx models, SCRFD detection",
    "onnx": "train --export to .onnx",
    "scikit-image": "5-point alignment (embed --detector, generate --align detect)",
    "diffusers": "generate (Arc2Face)",
    "transformers": "generate (Arc2Face's CLIP text encoder)",
    "tensorboard": "train's TensorBoard log (optional)",
}
REQUIRED = ("torch", "numpy", "safetensors", "opencv-python-headless", "simplejpeg", "pillow", "matplotlib", "scipy", "tqdm")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict[str, Any]:
    """Versions, devices and optional packages, as plain data (``hyperface env --json``)."""
    import torch

    from hyperface import __version__

    facts: dict[str, Any] = {
        "hyperface": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": {name: _version(name) for name in REQUIRED},
        "optional": {name: {"version": _version(name), "for": use} for name, use in OPTIONAL.items()},
        "torch": {
            "version": torch.__version__,
            "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        },
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts["gpus"].append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                  "capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8})
    if facts["optional"]["onnxruntime"]["version"]:
        try:
            facts["onnxruntime_providers"] = importlib.import_module("onnxruntime").get_available_providers()
        except Exception as exc:  # a broken install is worth reporting, not crashing on
            facts["onnxruntime_providers"] = f"import failed: {exc}"
    facts["distributed"] = {key: os.environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR") if key in os.environ}
    return facts


def format_environment(facts: dict[str, Any]) -> str:
    lines = [
        f"hyperface {facts['hyperface']}, Python {facts['python']}, {facts['platform']}",
        f"CPU cores {facts['cpu_cores']}, torch threads {facts['torch_threads']}",
    ]
    t = facts["torch"]
    cuda = f"CUDA build {t['cuda_build']}" if t["cuda_build"] else "CPU-only build"
    lines.append(f"torch {t['version']} ({cuda}; CUDA {'available' if t['cuda_available'] else 'not available'}"
                 + (f", cuDNN {t['cudnn']}" if t["cudnn"] else "") + (", MPS available" if t["mps_available"] else "") + ")")
    for gpu in facts["gpus"]:
        lines.append(f"  cuda:{gpu['index']} {gpu['name']}, {gpu['memory_gib']} GiB, compute {gpu['capability']}"
                     + ("" if gpu["bf16"] else " (no bf16: --dtype fp16)"))
    if t["cuda_build"] and not t["cuda_available"]:
        lines.append("  a CUDA build of torch that sees no GPU: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    lines.append("packages: " + ", ".join(f"{name} {version or 'MISSING'}" for name, version in facts["packages"].items()))
    lines.append("optional:")
    width = max(len(name) for name in facts["optional"])
    for name, entry in facts["optional"].items():
        state = entry["version"] or "not installed"
        lines.append(f"  {name:<{width}}  {state:<14} {entry['for']}")
    providers = facts.get("onnxruntime_providers")
    if providers:
        lines.append(f"onnxruntime providers: {', '.join(providers) if isinstance(providers, list) else providers}")
    if facts["distributed"]:
        lines.append("torchrun: " + ", ".join(f"{k}={v}" for k, v in facts["distributed"].items()))
    missing = [name for name, entry in facts["optional"].items() if not entry["version"] and name != "tensorboard"]
    if missing:
        extras = sorted({"recognition" if name in ("onnxruntime", "onnx", "scikit-image") else "generation" for name in missing})
        lines.append(f"to add what is missing: pip install 'hyperface[{','.join(extras)}]' (or pip install {' '.join(missing)})")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "env",
        help="versions, devices and optional packages of this machine (for bug reports)",
        description="Print what hyperface finds on this machine: versions, GPUs, optional packages and the stages "
                    "that need them. Paste it into bug reports.",
    )
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    facts = environment_report()
    if args.json:
        import json

        print(json.dumps(facts, indent=2))
    else:
        print(format_environment(facts))
    return 0
