"""Train an iResNet face-recognition model: one readable loop (nanoGPT style).

    from hyperface.training import TrainConfig, train
    result = train(TrainConfig(data="hyperface-10k/", out="runs/r50", arch="r50", loss="arcface"))

One process trains on one device; under ``torchrun`` (``WORLD_SIZE > 1``) every process trains one
GPU with DDP on the backbone and a partial-FC head whose class centres are sharded over the ranks
(as insightface's arcface_torch does). ``batch_size`` is per process. Rank 0 writes logs, exports
and the manifest; every rank writes its own head shard and optimiser state in each checkpoint.

Resume is exact: the data order, each sample's augmentation and partial-FC's negative sampling are
functions of (seed, epoch, step), and a checkpoint holds everything else (weights, optimiser,
grad scaler, AdaFace's EMA, RNG, epoch and position in it). An interrupted run restarted with
``resume=True`` replays from its last checkpoint and ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hyperface.common.errors import HyperfaceError, check_option, exception_summary
from hyperface.common.io import atomic_write, prepare_output_dir, releases_output_locks, remove_stale_temporaries
from hyperface.common.manifest import Manifest, describe_changes
from hyperface.common.runtime import StopRequest, get_logger, progress, progress_enabled, resolve_device
from hyperface.common.text import unique_labels
from hyperface.training import checkpoint as ckpt
from hyperface.training.data import AugmentConfig, ResumableSampler, TrainDataset, check_labels
from hyperface.training.losses import HEAD_INITS, PartialFC, build_margin

log = get_logger("hyperface.train")

#: Settings that must not change when a run is resumed, finished or not: the weights would not fit,
#: or the resumed run would no longer be the one its config.json and manifest.json describe. What may
#: change: run length limits (--max-steps), where and how fast it runs (--device, --workers, --amp,
#: --compile, --channels-last), logging, checkpointing, verification sets and the data's path.
_RESUME_FIXED = (
    "arch", "embedding_size", "dropout", "loss", "margin_s", "margin_m", "margin_gradient", "partial_fc", "epochs", "batch_size",
    "optimizer", "lr", "weight_decay", "momentum", "schedule", "milestones", "gamma", "poly_power",
    "warmup_epochs", "clip_grad_norm", "augment", "augment_p", "seed", "interclass_filtering", "grad_accum",
    "head_init", "bn_weight_decay",
)
#: The data subset a run trains on: part of its data, compared through the data fingerprint.
_SUBSET_FIELDS = ("identities", "images_per_identity")


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in config.json and manifest.json).

    Defaults are the common synthetic-data recipe: iResNet-50, ArcFace, SGD lr 0.1 momentum 0.9
    wd 5e-4, 26 epochs with x0.1 steps at epochs 12/20/24, horizontal flip.
    """

    data: str | tuple[str, ...]  # several: read as one, identities one after another (ConcatDataset)
    out: str
    identities: int | None = None  # train on identities 0..N-1 of the data only (ablations); None: all
    images_per_identity: int | None = None  # the first K images of each identity only; None: all
    arch: str = "r50"
    embedding_size: int = 512
    loss: str = "arcface"
    margin_s: float | None = None  # None: the loss's published default (64)
    margin_m: float | None = None  # None: 0.5 ArcFace, 0.4 CosFace/AdaFace
    margin_gradient: str = "exact"  # ArcFace: "straight-through" is current arcface_torch's
    epochs: int = 26
    batch_size: int = 128  # per process and forward pass
    grad_accum: int = 1  # forward passes per optimiser step: the step sees batch_size x grad_accum images per process
    optimizer: str = "sgd"  # sgd | adamw
    lr: float | None = None  # None: 0.1 for SGD, 1e-3 for AdamW
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 5e-4 for SGD, 0.05 for AdamW
    bn_weight_decay: bool = True  # False: BatchNorm parameters get none (AdaFace's split_parameters)
    schedule: str = "step"  # step | poly
    milestones: tuple[int, ...] = (12, 20, 24)  # epochs, for the step schedule
    gamma: float = 0.1
    poly_power: float = 2.0  # arcface_torch PolyScheduler's; its later PolynomialLRWarmup, as train_v2 calls it, decays linearly (1)
    warmup_epochs: float = 0.0
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; none on CPU) | bf16 | fp16 | none
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    clip_grad_norm: float = 5.0  # on the backbone, as arcface_torch; 0 disables
    partial_fc: float = 1.0  # sample rate of class centres (1.0 = full softmax)
    head_init: str = "normal"  # class centres: normal N(0, 0.01) (arcface_torch) | unit (AdaFace: unit-norm)
    interclass_filtering: float = 0.0  # > 0: non-target centres above this cosine get logit 0 (arcface_torch)
    augment: str = "flip"  # none | flip | adaface
    augment_p: float = 0.2  # probability of each AdaFace augmentation
    dropout: float = 0.0
    val_bins: tuple[str, ...] = ()
    val_every: int = 0  # steps; 0 = at the end of every epoch
    checkpoint_every: int = 2000  # steps (plus one at the end of every epoch); 0 = epochs only
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    workers: int | None = None  # None: min(8, CPU cores per process on this node)
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    max_steps: int | None = None  # stop early (after a checkpoint); the schedule still spans all epochs

    def resolved(self) -> "TrainConfig":
        """Fill the optimiser-dependent defaults and validate choices."""
        if self.optimizer not in ("sgd", "adamw"):
            raise HyperfaceError(f"unknown --optimizer {self.optimizer!r}: use sgd or adamw")
        if self.schedule not in ("step", "poly"):
            raise HyperfaceError(f"unknown --schedule {self.schedule!r}: use step or poly")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise HyperfaceError(f"unknown --amp {self.amp!r}: use auto, bf16, fp16 or none")
        if self.augment not in ("none", "flip", "adaface"):
            raise HyperfaceError(f"unknown --augment {self.augment!r}: use none, flip or adaface")
        if self.head_init not in HEAD_INITS:
            raise HyperfaceError(f"unknown --head-init {self.head_init!r}: use normal or unit")
        if not isinstance(self.bn_weight_decay, (bool, np.bool_)):  # a "false" string would read as true
            raise HyperfaceError(f"bn_weight_decay (--bn-weight-decay, --no-bn-weight-decay) must be True or False, "
                                 f"got {self.bn_weight_decay!r}")
        from hyperface.recognition.backbones import canonical_arch, check_arch

        check_arch(self.arch, dropout=self.dropout)  # an unknown --arch fails here, before any output
        self._check_ranges()
        build_margin(self.loss, s=self.margin_s, m=self.margin_m, gradient=self.margin_gradient)  # the loss's own checks
        cfg = TrainConfig(**asdict(self))
        cfg.arch = canonical_arch(self.arch)  # "R50" trains, checkpoints and exports as "r50"
        cfg.lr = self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)
        if cfg.weight_decay is None:
            cfg.weight_decay = 5e-4 if self.optimizer == "sgd" else 0.05
        cfg.milestones = tuple(int(m) for m in self.milestones)
        cfg.bn_weight_decay = bool(self.bn_weight_decay)
        cfg.val_bins = tuple(str(p) for p in self.val_bins)
        data = self.data_paths()
        if not data:
            raise HyperfaceError("give the training dataset (DATA)")
        cfg.data = str(data[0]) if len(data) == 1 else tuple(data)
        return cfg

    def data_paths(self) -> list[str]:
        """DATA as a list of paths (one set is stored as a str, several as a tuple)."""
        return [str(self.data)] if isinstance(self.data, (str, os.PathLike)) else [str(p) for p in self.data]

    def _check_ranges(self) -> None:
        """Every numeric option within its valid range, or one error naming the flag."""

        checks: list[tuple[str, Any, bool, Callable[[float], bool], str]] = [
            # (flag, value, integer, valid, rule)
            ("--embedding-size", self.embedding_size, True, lambda v: v >= 2, ">= 2"),
            ("--dropout", self.dropout, False, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("--partial-fc", self.partial_fc, False, lambda v: 0.0 < v <= 1.0, "in (0, 1] (1 = full softmax)"),
            ("--interclass-filtering", self.interclass_filtering, False, lambda v: 0.0 <= v < 1.0, "a cosine in [0, 1) (0 = off)"),
            ("--epochs", self.epochs, True, lambda v: v >= 1, ">= 1"),
            ("--batch-size", self.batch_size, True, lambda v: v >= 2, ">= 2 (BatchNorm needs 2 samples)"),
            ("--grad-accum", self.grad_accum, True, lambda v: v >= 1, ">= 1 (1 = no accumulation)"),
            ("--momentum", self.momentum, False, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("--gamma", self.gamma, False, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
            ("--poly-power", self.poly_power, False, lambda v: v > 0, "> 0"),
            ("--warmup-epochs", self.warmup_epochs, False, lambda v: 0.0 <= v <= self.epochs, f"in [0, --epochs {self.epochs}]"),
            ("--clip-grad-norm", self.clip_grad_norm, False, lambda v: v >= 0, ">= 0 (0 = off)"),
            ("--augment-p", self.augment_p, False, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
            ("--val-every", self.val_every, True, lambda v: v >= 0, ">= 0 (0 = every epoch)"),
            ("--checkpoint-every", self.checkpoint_every, True, lambda v: v >= 0, ">= 0 (0 = epochs only)"),
            ("--keep-checkpoints", self.keep_checkpoints, True, lambda v: v >= 0, ">= 0 (0 = keep all)"),
            ("--log-every", self.log_every, True, lambda v: v >= 1, ">= 1"),
            *((flag, value, True, lambda v: v >= 1, ">= 1") for flag, value in
              (("--identities", self.identities), ("--images-per-identity", self.images_per_identity)) if value is not None),
            ("--seed", self.seed, True, lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
        ]
        optional = [
            ("--lr", self.lr, False, lambda v: v > 0, "> 0"),
            ("--weight-decay", self.weight_decay, False, lambda v: v >= 0, ">= 0"),
            ("--margin-s", self.margin_s, False, lambda v: v > 0, "> 0"),
            ("--margin-m", self.margin_m, False, lambda v: 0.0 <= v < math.pi / 2, "in [0, pi/2)"),
            ("--workers", self.workers, True, lambda v: v >= 0, ">= 0 (0 = load in the main process)"),
            ("--max-steps", self.max_steps, True, lambda v: v >= 1, ">= 1 (leave it out to train every --epochs)"),
        ]
        for flag, value, integer, valid, rule in checks + [c for c in optional if c[1] is not None]:
            check_option(flag, value, valid, rule, integer=integer, finite=True)
        for m in self.milestones:
            check_option("--milestones", m, lambda v: v >= 1, "epochs >= 1", integer=True)


@dataclass
class TrainResult:
    out: Path
    steps: int
    epochs_done: int
    last_loss: float | None
    val: dict[str, float] = field(default_factory=dict)
    nothing_to_do: bool = False  # resumed a run that had already reached its last step


def _plain(value: Any) -> Any:
    """A config value as config.json / meta.json store it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _margin_value(key: str, value: float | None, loss: str) -> float | None:
    """``margin_s``/``margin_m`` as the run uses it: None stands for the loss's default."""
    if value is not None:
        return value
    try:
        return float(getattr(build_margin(loss), key.removeprefix("margin_")))
    except (HyperfaceError, AttributeError):  # an unknown loss is refused elsewhere
        return None


def _check_resume_settings(
    out: Path, meta: dict[str, Any], cfg: TrainConfig, *, world: int, num_classes: int, data_fingerprint: str
) -> None:
    """Refuse to resume a run (finished or not) with settings or data that change what it trains.
    The data is compared by content (the reader's fingerprint), not by path: a dataset copied to
    local disk resumes, another dataset at the same path does not."""
    # a setting an older version did not record had its default then
    defaults = TrainConfig(data="", out="")
    fixed = (*_RESUME_FIXED, *_SUBSET_FIELDS)
    saved = {k: meta["config"].get(k, _plain(getattr(defaults, k))) for k in fixed}
    now = {k: _plain(getattr(cfg, k)) for k in fixed}
    for key in ("margin_s", "margin_m"):  # unset means the loss's own value: `--margin-m 0.5` with ArcFace is no change
        saved[key], now[key] = (_margin_value(key, value, loss) for value, loss in ((saved[key], saved["loss"]), (now[key], now["loss"])))
    changed = [k for k in fixed if saved[k] != now[k]]
    what = [describe_changes({k: saved[k] for k in changed}, {k: now[k] for k in changed})] if changed else []
    if meta["world_size"] != world:
        what.append(f"world size {meta['world_size']} -> {world}")
    if any(k in _SUBSET_FIELDS for k in changed):
        pass  # another subset: its class count and fingerprint differ too, for that reason only
    elif meta["num_classes"] != num_classes:
        what.append(f"classes {meta['num_classes']} -> {num_classes}")
    elif meta.get("data_fingerprint", data_fingerprint) != data_fingerprint:  # older checkpoints lack it
        saved_data = meta.get("config", {}).get("data", "?")
        saved_data = saved_data if isinstance(saved_data, str) else ", ".join(map(str, saved_data)) + ", in this order"
        what.append(f"the dataset's content differs from the one it trained on ({saved_data})")
    if what:
        raise HyperfaceError(
            f"cannot --resume {out}: the run was started with different settings ({', '.join(what)}); "
            "resume with the original settings, or train a new run in another --out"
        )


def _finished_manifest(out: Path, step: int) -> dict[str, Any] | None:
    """The run's manifest.json when it records this very step (the run already ended there), else None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("stage") != "train" or manifest.get("steps") != step:
        return None
    return manifest


def _verifications(out: Path) -> dict[int, dict[str, float]]:
    """The verification results metrics.jsonl holds, by step. Every rank reads it (the run folder is
    shared), so all decide alike whether to verify again on resume."""
    found: dict[int, dict[str, float]] = {}
    try:
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("val"), dict) and isinstance(row.get("step"), int):
            found[row["step"]] = row["val"]
    return found


def _format_eta(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def learning_rate(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """LR of optimiser step ``step`` (0-based): linear warmup from 0, then step decay at the milestones
    or polynomial decay, with arcface_torch's ``PolyScheduler`` timing.

    ``train_v2.py`` steps that scheduler after every forward pass, and its constructor sets
    ``last_epoch`` back to -1 after the first ``step()``, so forward pass p (1-based) trains at the
    schedule's value for pass ``max(0, p - 2)``: a warmup of W steps starts with two steps at lr 0 and
    reaches the base lr at step W + 1 (0-based), and the polynomial decay runs one step behind its formula.
    Counted here in forward passes (``--grad-accum K``: step k ends pass K(k+1), as there), with
    PolyScheduler's own arithmetic, so every lr equals its float. The step schedule's milestones
    fall on epoch boundaries, as AdaFace's epoch-wise ``MultiStepLR``.
    """
    base = float(cfg.lr)
    accum = max(1, int(cfg.grad_accum))
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch)) * accum  # in forward passes
    position = max(0, accum * (step + 1) - 2)  # the scheduler's last_epoch when this step's optimiser.step() runs
    if position < warmup:
        return base * (float(position) / float(warmup))
    if cfg.schedule == "step":
        passed = sum(step >= m * steps_per_epoch for m in cfg.milestones)
        return base * cfg.gamma**passed
    progress_ = float(position - warmup) / float(max(1, total_steps * accum - warmup))
    return base * max(0.0, 1.0 - progress_) ** cfg.poly_power


def build_head(cfg: TrainConfig, num_classes: int, rank: int, world: int) -> PartialFC:
    """This rank's partial-FC head (its shard of the class centres, on the CPU). Its centres start
    as ``cfg.head_init`` says, from the global RNG seeded with (seed, rank): reproducible from the
    seed, and every rank's shard drawn apart from the others' (with one process it is all of them)."""
    torch.manual_seed(cfg.seed * 1009 + 17 + rank)
    margin = build_margin(cfg.loss, s=cfg.margin_s, m=cfg.margin_m, gradient=cfg.margin_gradient)
    return PartialFC(margin, cfg.embedding_size, num_classes, sample_rate=cfg.partial_fc, rank=rank, world_size=world,
                     interclass_filtering=cfg.interclass_filtering, init=cfg.head_init)


def batchnorm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module``'s BatchNorm layers: those of every sub-module that is a
    ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, their lazy forms),
    AdaFace's ``split_parameters`` rule (train_val.py). LayerNorm, GroupNorm, InstanceNorm and PReLU
    are not among them."""
    return [p for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters(recurse=False)]


def build_optimizer(cfg: TrainConfig, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable backbone parameters and the head's centres, all
    with ``cfg.weight_decay`` (arcface_torch), or with ``bn_weight_decay=False`` in two groups as
    AdaFace's ``configure_optimizers``: the BatchNorm parameters (:func:`batchnorm_parameters`) at
    weight decay 0, every other parameter, the centres included, at ``cfg.weight_decay``."""
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    groups: list[dict[str, Any]] = [{"params": params}]
    if not cfg.bn_weight_decay:
        exempt = {id(p) for p in batchnorm_parameters(backbone)}
        groups = [{"params": [p for p in params if id(p) not in exempt]},
                  {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise HyperfaceError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on the CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_arg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg not in ("cpu",)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class MetricsLog:
    """metrics.jsonl (always), its curves in metrics.png (redrawn at most once a minute, and when the
    loop ends) and TensorBoard (when installed); rank 0 only."""

    DRAW_EVERY_SECONDS = 60.0

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.out = out
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        self.last_drawn = time.time()
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop lines from steps the resumed run will replay, so the log has no duplicates, and a
            # line a kill cut short; rewritten atomically, so a kill now loses nothing.
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            with atomic_write(self.path, "w") as handle:
                handle.write("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
        except ImportError:
            pass  # tensorboard is optional; metrics.jsonl has everything

    def write(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if time.time() - self.last_drawn > self.DRAW_EVERY_SECONDS:
            self.draw()
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for sub, number in value.items():
                        self.tensorboard.add_scalar(f"{key}/{sub}", number, step)

    def draw(self) -> None:
        """Redraw metrics.png; a plotting failure is a warning, never the end of a training run."""
        if not self.enabled or not self.path.exists():
            return
        from hyperface.training.plots import PLOT_FILE, plot_metrics

        try:
            plot_metrics(self.out)
        except Exception as exc:  # noqa: BLE001 - matplotlib can fail in many ways; training goes on
            log.warning("could not draw %s: %s", PLOT_FILE, exception_summary(exc))
        self.last_drawn = time.time()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW -> float (x - 127.5) / 127.5 on the device (normalising there is cheaper)."""
    x = images.to(device, non_blocking=True).float().sub_(127.5).div_(127.5)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_embed_fn(backbone: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, batch_size: int = 256):
    """``embed(images uint8 NHWC RGB) -> float32 (N, D)`` with the backbone in eval mode."""

    @torch.no_grad()
    def embed(images: np.ndarray) -> np.ndarray:
        was_training = backbone.training
        backbone.eval()
        try:
            outputs = []
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
                x = _to_input(chunk, device, channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    outputs.append(backbone(x).float().cpu().numpy())
            return np.concatenate(outputs) if outputs else np.zeros((0, backbone.embedding_size), np.float32)
        finally:
            backbone.train(was_training)

    return embed


def train_step(
    model: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    clip_params=None,
    clip_grad_norm: float = 0.0,
    generator: torch.Generator | None = None,
    accumulate: int = 1,
) -> torch.Tensor:
    """One optimiser step on a batch of uint8 NCHW images; returns the (detached) loss on the device.

    ``accumulate`` > 1 splits the batch into that many forward passes whose gradients add up (each
    loss divided by ``accumulate``: the step follows the mean loss of the whole batch); BatchNorm,
    AdaFace's norm statistics and partial-FC sampling see each pass alone, as in arcface_torch's
    ``gradient_acc``. Under DDP the backbone's gradients are all-reduced once, after the last pass.
    """
    if accumulate < 1 or images.shape[0] % accumulate:
        raise HyperfaceError(f"a batch of {images.shape[0]} images does not split into {accumulate} equal passes")
    optimizer.zero_grad(set_to_none=True)
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    chunk = images.shape[0] // accumulate
    total = torch.zeros((), device=device)
    for i in range(accumulate):
        part = slice(i * chunk, (i + 1) * chunk)
        x = _to_input(images[part], device, channels_last)
        part_labels = labels[part].to(device, non_blocking=True)
        last = i == accumulate - 1
        sync = ddp.no_sync() if not last and isinstance(ddp, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                embeddings = model(x)
            # The head stays in fp32: with s=64 a bf16 cosine (8-bit mantissa) would add logit noise of
            # ~0.25, and its matmul is small next to the backbone's (TF32 on CUDA keeps it fast).
            loss = head(embeddings.float(), part_labels, generator) / accumulate
            scaler.scale(loss).backward()
        total += loss.detach()
    if clip_grad_norm > 0 and clip_params is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(clip_params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return total


def _diverged(step: int, kept: Path | None) -> HyperfaceError:
    """The error for a loss or weights gone NaN/inf (nothing of them is saved)."""
    newest = f"the newest checkpoint kept, {kept.name}, holds the last finite weights" if kept else "no checkpoint was saved before"
    return HyperfaceError(
        f"training diverged: the loss, the weights or the model's outputs became NaN/inf by step {step}; they were "
        f"not saved, and {newest}. Lower --lr or keep --clip-grad-norm above 0, and start again with --overwrite"
    )


def _all_finite(tensors, world: int, device: torch.device) -> bool:
    """Whether every tensor is finite, on every rank (one sync; ranks agree, so all stop together)."""
    flag = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(device=device, dtype=torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _leave_signals_to_main(worker_id: int, owner: int | None = None) -> None:
    """DataLoader workers leave Ctrl-C and an outside SIGTERM to the main process, which finishes the
    step, checkpoints and stops. Slurm (scancel, the time limit) signals every process of the job: a
    worker dying of it would make the main process fail mid-checkpoint ("DataLoader worker killed by
    signal"). A SIGTERM from the main process itself (multiprocessing ending its workers at exit)
    still ends the worker, as one whose parent died ends on its own."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, inherited by fork
    if not hasattr(signal, "sigwaitinfo"):  # no sender to tell apart (macOS): die of it, as before
        return
    # The process that owns the loader (given: with forkserver or spawn the parent is another process)
    owner = owner if owner is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by the thread below only

    def watch() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != owner:
            pass  # an outside SIGTERM: the main process has one too and stops the run (torch's watchdog
            # ends this worker if the owner dies)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)  # die of it, as the parent expects

    threading.Thread(target=watch, name="sigterm-from-parent", daemon=True).start()


def _end_loader_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop the loader's persistent workers now, the orderly way. After an error or a stop by signal
    the traceback keeps the iterator alive, and multiprocessing would end the workers at exit with
    SIGTERM, which torch then reports as "DataLoader worker killed by signal"."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own teardown (private, hence the care)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def train(config: TrainConfig, *, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run (or resume) a training run; see :class:`TrainConfig`. ``on_step(step, info)`` is called
    after every optimiser step with ``{"epoch", "lr", "loss"}`` (loss as a detached tensor)."""
    # Under torchrun the process group this call starts is also ended here when the run ends well:
    # a gloo group left to the interpreter's exit can abort the process (SIGABRT, "terminate called
    # without an active exception") after a successful run, and NCCL warns about it. Not after a
    # failure: peers may sit in a collective that an NCCL destroy would wait on; torchrun ends them.
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    result = _train(config, on_step)
    if owns_group and dist.is_initialized():
        dist.barrier()  # every rank done with its collectives before any group goes
        dist.destroy_process_group()
    return result


@releases_output_locks
def _train(config: TrainConfig, on_step: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    from hyperface.datasets import check_outside_datasets
    from hyperface.datasets.concat import concat_parts, open_datasets
    from hyperface.recognition.backbones import create_backbone

    cfg = config.resolved()
    started = time.time()
    rank, world, device = _init_distributed(cfg.device)
    is_main = rank == 0
    out = Path(cfg.out)
    # a run folder inside an image folder would become one more class of it
    check_outside_datasets(out, cfg.data_paths(), folder=True)

    # --- data, and everything else that can be refused, before --overwrite clears a finished run ---
    reader = open_datasets(cfg.data, warn=is_main)
    if cfg.identities is not None or cfg.images_per_identity is not None:
        from hyperface.datasets.subset import DatasetSubset

        reader = DatasetSubset(reader, identities=cfg.identities, per_identity=cfg.images_per_identity, warn=is_main)
        if is_main:
            log.info("training on %d identities x up to %s images: %d of the data's %d images", reader.num_classes,
                     cfg.images_per_identity or "all", len(reader), len(reader.reader))
    num_classes = int(reader.num_classes)
    data_fingerprint = reader.fingerprint()
    empty_classes = check_labels(reader.labels, num_classes)
    if empty_classes and is_main:  # each empty class still gets a centre (and its momentum) in the head
        log.warning(
            "%d of the dataset's %d classes have no image (labels are not consecutive): their class centres "
            "take %.2f GB and only ever act as negatives; `hyperface dataset convert DATA --relabel --out NEW` "
            "numbers the classes 0..K-1",
            empty_classes, num_classes, empty_classes * cfg.embedding_size * 4 * 2 / 1e9,
        )
    missing = [p for p in cfg.val_bins if not Path(p).is_file()]
    if missing:  # fail now, not after the first epoch
        raise HyperfaceError(f"--val-bin file(s) not found: {', '.join(missing)}")
    val_sets: dict[str, tuple] = {}  # decoded once, before training: a bad file fails now, not after an epoch
    val_names: list[str] = []
    if is_main and cfg.val_bins:
        from hyperface.evaluation.verification import FOLDS, load_bin

        val_sets = {bin_path: load_bin(bin_path) for bin_path in cfg.val_bins}
        val_names = unique_labels([Path(bin_path).stem for bin_path in cfg.val_bins])  # two holdout.bin: holdout (2)
        for bin_path, (_, issame) in val_sets.items():
            if len(issame) < FOLDS:
                raise HyperfaceError(
                    f"--val-bin {bin_path} holds {len(issame)} pair(s): verification splits pairs into {FOLDS} "
                    "folds, so it needs at least that many (LFW has 6,000)"
                )
    if is_main:
        prepare_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume, stage="train", setup_files=("config.json",))
        # rank 0 alone writes these two folders' own files: any temporary left is a killed attempt's
        for folder in (out, out / ckpt.CHECKPOINTS):
            remove_stale_temporaries(folder)
    _barrier(world)

    augment = {"none": AugmentConfig(flip=False), "flip": AugmentConfig(), "adaface": AugmentConfig.adaface(cfg.augment_p)}[cfg.augment]
    dataset = TrainDataset(reader, augment=augment, seed=cfg.seed)
    sampler = ResumableSampler(len(dataset), seed=cfg.seed, rank=rank, world_size=world)
    step_batch = cfg.batch_size * cfg.grad_accum  # images per process per optimiser step
    steps_per_epoch = sampler.per_rank // step_batch
    if steps_per_epoch == 0:
        accum = f" x --grad-accum {cfg.grad_accum}" if cfg.grad_accum > 1 else ""
        raise HyperfaceError(
            f"--batch-size {cfg.batch_size}{accum} is larger than the {sampler.per_rank} images each of the "
            f"{world} process(es) gets per epoch; lower --batch-size" + (" or --grad-accum" if cfg.grad_accum > 1 else "")
        )
    total_steps = cfg.epochs * steps_per_epoch
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = cfg.workers if cfg.workers is not None else min(8, max(1, (os.cpu_count() or 2) // local_world - 1))

    # --- model, head, optimiser -----------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # same initial backbone on every rank; head shards differ by design
    backbone = create_backbone(cfg.arch, embedding_size=cfg.embedding_size, dropout=cfg.dropout).to(device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    head = build_head(cfg, num_classes, rank, world).to(device)
    margin = head.margin
    optimizer = build_optimizer(cfg, backbone, head)
    amp_dtype = _amp_dtype(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed 112x112 inputs: autotune the convolutions once
    # --amp fp16 only; growth every 100 steps as arcface_torch (torch's default waits 2000).
    scaler = torch.amp.GradScaler(device.type, growth_interval=100, enabled=amp_dtype == torch.float16)

    # --- resume ---------------------------------------------------------------------------------
    step, epoch, step_in_epoch, last_loss = 0, 0, 0, None
    # the loss-logging window open at a checkpoint: a resumed run logs the same averages
    window: dict[str, Any] = {"loss_sum": 0.0, "count": 0, "images": 0}
    resumed_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    if resumed_from is not None and is_main:  # finish a pruning a kill interrupted
        ckpt.prune_checkpoints(out / ckpt.CHECKPOINTS, resumed_from, cfg.keep_checkpoints)
    if resumed_from is not None:
        previous = ckpt.previous_checkpoint(out, resumed_from)
        pointer = out / ckpt.CHECKPOINTS / ckpt.LATEST
        hint = (f"to resume from the one before, write {previous.name} into {pointer}" if previous
                else "no older checkpoint is kept: start over with --overwrite")
        try:
            meta = json.loads((resumed_from / "meta.json").read_text(encoding="utf-8"))
        except ValueError as exc:  # damaged on disk after it was written (files are atomic)
            raise HyperfaceError(f"cannot resume from {resumed_from}: its meta.json is damaged ({exc}); {hint}") from exc
        # settings first: another world size is "world size 1 -> 2", not a missing head-rank1 file
        _check_resume_settings(out, meta, cfg, world=world, num_classes=num_classes, data_fingerprint=data_fingerprint)
        try:
            backbone_state = ckpt.load_safetensors(resumed_from / "backbone.safetensors", device)
            head_state = ckpt.load_safetensors(resumed_from / f"head-rank{rank}.safetensors", device)
            state = ckpt.load_torch(resumed_from / f"state-rank{rank}.pt", device)
        except HyperfaceError as exc:
            raise HyperfaceError(f"cannot resume from {resumed_from}: {exc}; {hint}") from exc
        backbone.load_state_dict(backbone_state)
        head.load_state_dict(head_state)
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and scaler.is_enabled():  # empty when saved without fp16
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        step, epoch, step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        last_loss = state.get("last_loss")
        window = state.get("window") or window
        log.info("resumed %s at step %d (epoch %d, step %d of %d)", resumed_from, step, epoch, step_in_epoch, steps_per_epoch)
    elif is_main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")

    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    if resumed_from is not None and step >= stop_at:
        finished = _finished_manifest(out, step)
        if finished is not None:  # nothing to train: keep backbone.pth and manifest.json as they are
            if is_main:
                log.info("%s already trained %d of %d steps; nothing to resume", out, step, total_steps)
            _barrier(world)
            return TrainResult(
                out=out, steps=step, epochs_done=epoch, last_loss=finished.get("last_loss", last_loss),
                val=dict(finished.get("verification") or {}), nothing_to_do=True,
            )

    model: nn.Module = backbone
    if world > 1:
        # BatchNorm statistics stay per GPU, as in arcface_torch (no buffer broadcast each step): the
        # training forward uses batch statistics, and the saved model holds rank 0's.
        model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if cfg.compile:
        model = torch.compile(model)

    metrics = MetricsLog(out, enabled=is_main, resume_step=step if cfg.resume else None)
    embed = make_embed_fn(backbone, device, amp_dtype, channels_last)
    val_results: dict[str, float] = {}
    last_saved = step if resumed_from is not None else -1
    verified = _verifications(out) if resumed_from is not None else {}
    earlier = [s for s in verified if s <= step]
    if earlier:  # the manifest of a resumed run reports the latest verification
        val_results.update(verified[max(earlier)])
    if resumed_from is not None:
        if is_main and step < stop_at and (out / "backbone.pth").is_file():
            # the export of an earlier stop (--max-steps): stale once training goes on, and `evaluate RUN`
            # would take it over the newer checkpoints
            (out / "backbone.pth").unlink()
            log.info("removed %s/backbone.pth of the earlier stop; until this run ends, its newest weights are in %s/",
                     out, ckpt.CHECKPOINTS)

    def save(epoch_: int, step_in_epoch_: int) -> None:
        nonlocal last_saved
        if step == last_saved:
            return
        # Never a checkpoint of diverged weights: it would prune the last finite ones. The loss of the
        # steps since the last log, and the state itself (inf gradients can leave a finite loss, and
        # BatchNorm's running statistics overflow before the weights do).
        window_loss = running_loss if running_count else torch.zeros((), device=device)
        if not _all_finite([window_loss, *backbone.state_dict().values(), *head.state_dict().values()], world, device):
            raise _diverged(step, ckpt.latest_checkpoint(out))
        path = out / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step)
        if is_main:
            path.mkdir(parents=True, exist_ok=True)
            ckpt.save_safetensors(backbone.state_dict(), path / "backbone.safetensors", metadata={"arch": cfg.arch})
        _barrier(world)
        ckpt.save_safetensors(head.state_dict(), path / f"head-rank{rank}.safetensors")
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "step": step,
            "epoch": epoch_,
            "step_in_epoch": step_in_epoch_,
            "last_loss": last_loss,
            "window": {"loss_sum": float(running_loss), "count": running_count, "images": window_images},
        }
        ckpt.save_torch(state, path / f"state-rank{rank}.pt")
        _barrier(world)
        if is_main:
            meta = {
                "step": step, "epoch": epoch_, "step_in_epoch": step_in_epoch_, "steps_per_epoch": steps_per_epoch,
                "arch": cfg.arch, "embedding_size": cfg.embedding_size, "num_classes": num_classes,
                "world_size": world, "data_fingerprint": data_fingerprint, "config": json.loads(json.dumps(asdict(cfg))),
            }
            ckpt.publish_checkpoint(out, path, meta, keep=cfg.keep_checkpoints)
        _barrier(world)
        last_saved = step

    def validate() -> None:
        if not cfg.val_bins:
            return
        # diverged weights embed as NaN: say that, not "embeddings contain NaN" (every rank checks alike)
        if not _all_finite([*backbone.state_dict().values()], world, device):
            raise _diverged(step, ckpt.latest_checkpoint(out))
        if is_main:
            from hyperface.evaluation.verification import evaluate_images

            results = {}
            for bin_path, name in zip(cfg.val_bins, val_names):
                try:
                    result = evaluate_images(embed, *val_sets[bin_path], flip=True)  # insightface's ten folds
                except HyperfaceError as exc:  # finite weights can still overflow to NaN features
                    if "NaN/inf" in str(exc):
                        raise _diverged(step, ckpt.latest_checkpoint(out)) from exc
                    raise
                results[name] = float(result.accuracy)
            val_results.update(results)
            # 1-based, as the log prints it: the epoch this step belongs to (validation at an epoch's
            # end runs after the counter moved on, when step_in_epoch is back at 0)
            metrics.write(step, epoch=epoch if step_in_epoch == 0 else epoch + 1, val=results)
            log.info("step %d verification: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        _barrier(world)

    verification_due = (cfg.val_every and step % cfg.val_every == 0) or (step_in_epoch == 0 and not cfg.val_every)
    # A checkpoint is published before its verification runs: a kill in between must not lose it.
    if resumed_from is not None and step > 0 and cfg.val_bins and verification_due and step not in verified:
        if is_main:
            log.info("step %d was checkpointed but not verified (stopped in between): verifying it now", step)
        validate()

    # --- the loop -------------------------------------------------------------------------------
    # without a terminal the loop logs its own lines every --log-every steps (loss, lr, img/s, eta)
    bar = progress(total=stop_at, desc="train", unit="step", initial=step, disable=not (is_main and progress_enabled()))
    log_lines = is_main and bool(getattr(bar, "disable", False))  # no bar (not a terminal): print the loss instead
    running_loss = torch.tensor(float(window["loss_sum"]), device=device)
    running_count, window_start, window_images = int(window["count"]), time.time(), int(window["images"])
    loop_start, loop_start_step = time.time(), step
    backbone.train()
    head.train()
    stop = StopRequest(log)
    # One loader for the whole run: its workers persist across epochs (no re-fork and re-open of the
    # data each epoch). The sampler is read in this process, so set_epoch takes effect at each
    # iter(loader), and a sample's augmentation depends only on its draw id, not on a worker. The
    # loader's own generator keeps its per-iterator seed draw off the global RNG, which dropout
    # uses: a resumed run would otherwise draw once more than the run it continues.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=step_batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        worker_init_fn=functools.partial(_leave_signals_to_main, owner=os.getpid()),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    try:
        while epoch < cfg.epochs and step < stop_at:
            sampler.set_epoch(epoch, start=step_in_epoch * step_batch)
            for images, labels in loader:
                lr = learning_rate(step, cfg, steps_per_epoch, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                generator = None
                if head.num_sample < head.num_local:  # partial FC: per-step seeded negative sampling
                    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * world + rank)
                loss = train_step(
                    model, head, optimizer, scaler, images, labels, device=device, amp_dtype=amp_dtype,
                    channels_last=channels_last, clip_params=backbone.parameters(), clip_grad_norm=cfg.clip_grad_norm,
                    generator=generator, accumulate=cfg.grad_accum,
                )
                step += 1
                step_in_epoch += 1
                running_loss += loss
                running_count += 1
                window_images += images.shape[0] * world
                if on_step is not None:
                    on_step(step, {"epoch": epoch, "lr": lr, "loss": loss})
                if step % max(1, cfg.log_every) == 0 or step == stop_at or step_in_epoch == steps_per_epoch:
                    last_loss = float(running_loss) / running_count  # one sync per log interval
                    if not math.isfinite(last_loss):
                        raise _diverged(step, ckpt.latest_checkpoint(out))
                    elapsed = max(1e-9, time.time() - window_start)
                    metrics.write(step, epoch=epoch + 1, loss=last_loss, lr=lr, images_per_s=window_images / elapsed)
                    bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
                    if log_lines:
                        steps_per_s = (step - loop_start_step) / max(1e-9, time.time() - loop_start)
                        log.info(
                            "step %d/%d  epoch %d/%d  loss %.4f  lr %.2e  %.1f img/s  eta %s",
                            step, stop_at, epoch + 1, cfg.epochs, last_loss, lr, window_images / elapsed,
                            _format_eta((stop_at - step) / steps_per_s if steps_per_s > 0 else 0.0),
                        )
                    running_loss.zero_()
                    running_count, window_start, window_images = 0, time.time(), 0
                bar.update(1)
                epoch_done = step_in_epoch == steps_per_epoch
                if epoch_done:
                    epoch, step_in_epoch = epoch + 1, 0
                if epoch_done or step >= stop_at or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    save(epoch, step_in_epoch)
                if (cfg.val_every and step % cfg.val_every == 0) or (epoch_done and not cfg.val_every):
                    paused = time.time()
                    validate()
                    window_start += time.time() - paused  # images/s is training's: verification time left out
                if stop.agreed(world, device):  # every step: ranks agree within StopRequest.LAG + 1 steps
                    save(epoch, step_in_epoch)
                    log.info("stopped by a signal at step %d after writing its checkpoint; rerun with --resume", step)
                    raise KeyboardInterrupt
                if epoch_done or step >= stop_at:
                    break  # the next epoch re-iterates the loader (and none past the last step)
    finally:
        _end_loader_workers(loader)
        stop.restore()
        bar.close()
        metrics.draw()  # also after a kill by signal or an error: the curves up to the last logged step

    # --- finish: export and manifest (rank 0) ----------------------------------------------------
    if is_main:
        ckpt.save_torch({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}, out / "backbone.pth")
        data_inputs = {"data": cfg.data} if isinstance(cfg.data, str) else {f"data_{i}": path for i, path in enumerate(cfg.data_paths())}
        manifest = Manifest(stage="train", params=json.loads(json.dumps(asdict(cfg))), inputs=data_inputs)
        manifest.started = started
        manifest.time("train", time.time() - started)
        manifest.extra.update(
            {
                "steps": step, "epochs_done": epoch, "steps_per_epoch": steps_per_epoch, "num_classes": num_classes,
                "num_images": len(dataset), "data_subset": reader.describe() if hasattr(reader, "indices") else None,
                **({"data_parts": parts} if (parts := concat_parts(reader)) else {}),
                "data_fingerprint": data_fingerprint, "world_size": world, "device": str(device), "workers": workers,
                "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none", "channels_last": channels_last,
                "last_loss": last_loss, "verification": val_results,
                "margin": {"s": float(margin.s), "m": float(margin.m)},  # the loss's defaults resolved
                "resumed_from": str(resumed_from) if resumed_from else None,
                "outputs": {"backbone": "backbone.pth", "checkpoints": ckpt.CHECKPOINTS, "metrics": "metrics.jsonl", "curves": "metrics.png"},
            }
        )
        manifest.write(out, status="complete" if step >= total_steps else "partial", checksum_inputs=False)
    metrics.close()
    _barrier(world)
    return TrainResult(out=out, steps=step, epochs_done=epoch, last_loss=last_loss, val=val_results)


__all__ = [
    "TrainConfig", "TrainResult", "batchnorm_parameters", "build_head", "build_optimizer", "learning_rate", "make_embed_fn", "train",
    "train_step",
]
