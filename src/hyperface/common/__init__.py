"""Conventions shared by every stage: errors, atomic files, manifests, seeding, devices, progress."""

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import (
    atomic_write,
    file_sha256,
    load_embeddings,
    prepare_output_dir,
    save_json,
    save_npy,
)
from hyperface.common.manifest import Manifest, write_manifest
from hyperface.common.runtime import get_logger, progress, resolve_device, seed_everything

__all__ = [
    "HyperfaceError",
    "Manifest",
    "atomic_write",
    "file_sha256",
    "get_logger",
    "load_embeddings",
    "prepare_output_dir",
    "progress",
    "resolve_device",
    "save_json",
    "save_npy",
    "seed_everything",
    "write_manifest",
]
