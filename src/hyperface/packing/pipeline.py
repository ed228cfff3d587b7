"""``hyperface pack`` as a function: optimise, measure, and write the run folder."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from hyperface.common.errors import HyperfaceError
from hyperface.common.io import (
    duplicate_rows, file_sha256, load_embeddings, prepare_output_dir, read_json, releases_output_locks, remove_stale_temporaries,
    save_json, save_npy,
)
from hyperface.common.manifest import Manifest
from hyperface.common.runtime import get_logger, resolve_device, seed_everything
from hyperface.packing.metrics import packing_report
from hyperface.packing.solver import (
    CHECKPOINT_NAME, PackConfig, check_checkpoint_every, config_key, pack, resolved_settings, resume_mismatch, settings_changes,
)

log = get_logger("hyperface.packing")

IDENTITIES_FILE = "identities.npy"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
PLOT_FILE = "pack.png"
REPRESENTATIVES_FILE = "representatives.npy"


@releases_output_locks
def run_pack(
    config: PackConfig,
    out_dir: str | Path,
    *,
    gallery_path: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_every: float = 60.0,
    plot: bool = True,
) -> dict[str, Any]:
    """Pack identities and write ``out_dir``:

    - ``identities.npy``  float32 (N, d), unit rows
    - ``metrics.json``    exact all-pairs metrics, the Levenshtein bound, the random baseline
    - ``history.json``    the min angle during optimisation
    - ``representatives.npy``  with ``symmetry="cyclic"``: the (ceil(N/d), d) orbit representatives
    - ``pack.png``        convergence and nearest-neighbour angle histogram
    - ``manifest.json``   parameters, versions, input checksums, timings (written last); ``resolved``:
      what the settings left to the run came to (see :func:`~hyperface.packing.solver.resolved_settings`)

    ``gallery_path`` is a .npy file or the folder ``hyperface embed`` wrote (its gallery.npy).
    A killed run leaves ``checkpoint.pt``; ``resume=True`` continues it. Returns the metrics.
    """
    out = Path(out_dir)
    if gallery_path is not None:
        from hyperface.recognition.embed import find_embeddings

        gallery_path = find_embeddings(gallery_path, flag="--gallery")
    gallery = load_embeddings(gallery_path, what="gallery") if gallery_path is not None else None
    if gallery is not None:
        repeats = np.flatnonzero(duplicate_rows(gallery))
        if repeats.size:  # harmless to the optimisation, but a sign the same image was embedded twice
            log.warning("%d gallery row(s) repeat an earlier row exactly, e.g. rows %s: the same face embedded twice?",
                        repeats.size, repeats[:5].tolist())
    cfg = config.resolved(gallery)  # validate before touching the output folder
    check_checkpoint_every(checkpoint_every)
    device = resolve_device(cfg.device)
    manifest_path = out / "manifest.json"
    if resume and manifest_path.exists():
        previous = read_json(manifest_path)
        if previous.get("status") == "complete" and previous.get("stage") == "pack":  # other stages: refused below
            # A finished run with other settings is not the run asked for: say so, don't return it.
            # keys an older version did not record are unknown; --compute-dtype is compared as what it picked
            before, after = settings_changes(previous.get("params") or {}, config_key(cfg), previous.get("resolved"),
                                             resolved_settings(cfg, device))
            if before:
                raise resume_mismatch(out, before, after)
            saved_gallery = (previous.get("inputs") or {}).get("gallery") or {}
            now_gallery = file_sha256(gallery_path) if gallery_path is not None else None
            if saved_gallery.get("sha256") != now_gallery:
                how = ("with another gallery" if now_gallery else "with a gallery") if saved_gallery else "without a gallery"
                original = f" ({saved_gallery['path']})" if saved_gallery.get("path") else ""
                raise HyperfaceError(f"cannot --resume {out}: it was packed {how}{original}; use the original --gallery, or --overwrite")
            lost = [name for name in (IDENTITIES_FILE, METRICS_FILE) if not (out / name).is_file()]
            if lost:  # the checkpoint went when the run finished: nothing to finish from
                raise HyperfaceError(
                    f"{out} is a finished run but {', '.join(lost)} {'is' if len(lost) == 1 else 'are'} gone; "
                    "nothing is left to resume from: pack it again with --overwrite (the same --seed gives the same run)"
                )
            log.info("%s is already complete; nothing to resume", out)
            (out / CHECKPOINT_NAME).unlink(missing_ok=True)  # a kill between the manifest and this left it
            return read_json(out / METRICS_FILE)
    out = prepare_output_dir(out, overwrite=overwrite, resume=resume, stage="pack")
    remove_stale_temporaries(out)  # one pack process per folder: any left is a killed attempt's
    seed_everything(cfg.seed)
    manifest = Manifest(stage="pack", params=dataclasses.asdict(cfg), inputs={"gallery": gallery_path})

    started = time.perf_counter()
    result = pack(cfg, gallery, checkpoint_dir=out, checkpoint_every=checkpoint_every, resume=resume)
    manifest.time("optimise", time.perf_counter() - started)

    started = time.perf_counter()
    metrics, nn_angles, gallery_sims = packing_report(result.points, gallery, device=device, representatives=result.representatives)
    metrics.update(
        {
            "steps": result.steps_done,
            "optimise_seconds": round(result.seconds, 3),
            "best_step": result.best_step,
            "best_restart": result.restart,
            "init": cfg.init,
            "mode": cfg.mode,
            "symmetry": cfg.symmetry,
            "compute_dtype": result.compute_dtype,
            "reg_weight": cfg.reg_weight,
            "seed": cfg.seed,
        }
    )
    manifest.time("metrics", time.perf_counter() - started)

    save_npy(out / IDENTITIES_FILE, result.points.astype(np.float32))
    if result.representatives is not None:  # cyclic symmetry: the orbit representatives generate it all
        save_npy(out / REPRESENTATIVES_FILE, result.representatives.astype(np.float32))
    save_json(out / METRICS_FILE, metrics)
    save_json(out / HISTORY_FILE, result.history)
    if plot:
        from hyperface.packing.plots import plot_packing

        plot_packing(out / PLOT_FILE, result.history, nn_angles, metrics, gallery_sims)
    manifest.extra["device"] = str(device)  # "auto" resolved
    # params keep --compute-dtype, --polish-steps and --device as given ("auto", null): what they came to
    manifest.extra["resolved"] = resolved_settings(cfg, device)
    manifest.extra["outputs"] = [IDENTITIES_FILE, METRICS_FILE, HISTORY_FILE] + ([PLOT_FILE] if plot else []) + (
        [REPRESENTATIVES_FILE] if result.representatives is not None else [])
    manifest.write(out)
    # The checkpoint holds optimiser state (several times the result's size): done with it.
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    return metrics


def load_identities(path: str | Path, dim: int | None = None) -> np.ndarray:
    """Read an ``identities.npy`` written by :func:`run_pack` (checked: unit rows, finite)."""
    if Path(path).is_dir():
        path = Path(path) / IDENTITIES_FILE
    if not Path(path).exists():
        raise HyperfaceError(
            f"no identities at {path}: give the identities .npy, or the folder `hyperface pack` wrote (it holds {IDENTITIES_FILE})"
        )
    return load_embeddings(path, what="identities", dim=dim, require_unit=True)
