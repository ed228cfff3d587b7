"""Margin-based softmax heads for face recognition: ArcFace, CosFace, AdaFace, and partial FC.

A *margin* turns the cosine logits ``cos(theta_j) = <f/|f|, w_j/|w_j|>`` of a batch into scaled,
margin-adjusted logits; only the target-class logit of each row is changed. Cross-entropy over
those logits is the loss. The margins here follow the published formulas:

- ArcFace (Deng et al. 2019): target ``s * cos(theta + m)``, s=64, m=0.5.
- CosFace (Wang et al. 2018): target ``s * (cos(theta) - m)``, s=64, m=0.4.
- AdaFace (Kim et al. 2022): target ``s * (cos(theta - m*z) - (m + m*z))`` where
  ``z = clip(h * (|f| - mu) / (sigma + eps), -1, 1)`` and mu/sigma are EMAs (t_alpha=0.01) of the
  batch mean/std of the detached, clipped feature norms; h=0.333, m=0.4, s=64.

Heads own the class centres and compute the loss:

- :class:`ClassifierHead`: all class centres on one device, plain ``F.cross_entropy``. Simple; the
  reference the partial-FC head is tested against.
- :class:`PartialFC` (An et al. 2022): the class centres are sharded over the ranks of a DDP job
  (one shard in a single process); every rank gathers the whole global batch of embeddings and
  labels, scores them against a *sample* of its centres (all positives of the batch plus random
  negatives, ``sample_rate`` of the shard) and the softmax cross-entropy is computed across ranks.
  With ``sample_rate=1`` it equals the full softmax. This is what the trainer always uses.

Every margin's state (AdaFace's EMA buffers) is a registered buffer, so ``state_dict`` captures it
and a resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hyperface.common.errors import HyperfaceError

#: Names accepted by :func:`build_margin` (and ``hyperface train --loss``).
MARGINS = ("arcface", "cosface", "adaface")


def _target_mask(labels: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Boolean (B, C) mask of each row's target column; rows with label -1 (not here) get none.

    Built by comparison, and the margins below use gather/where rather than boolean indexing: no
    data-dependent shapes, so no GPU-to-host sync in the training step.
    """
    return labels[:, None] == torch.arange(num_columns, device=labels.device)[None, :]


def _target_column(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 1) each row's target value (rows with label -1 get column 0: masked out by the caller)."""
    return values.gather(1, labels.clamp(min=0)[:, None])


class ArcFaceMargin(nn.Module):
    """Additive angular margin: target logit ``s * cos(theta + m)``.

    ``cos(theta + m)`` stops decreasing once ``theta + m > pi``, which would *reward* a worse
    angle. Like the ArcFace paper's code and insightface's earlier ``CombinedMarginLoss``, for
    ``theta > pi - m`` we instead use the CosFace-style linear continuation ``cos(theta) - m * sin(pi - m)``
    (monotone, continuous at ``theta = pi - m``), and the gradient is the formula's own. With
    ``easy_margin=True`` the margin is only applied where ``cos(theta) > 0`` (the original ArcFace
    "easy margin" variant).

    ``straight_through=True`` is current arcface_torch's ``CombinedMarginLoss``: it computes
    ``cos(arccos(cos theta) + m)`` inside ``torch.no_grad`` (no continuation branch), so the
    gradient passes through the margin as if it were not there (``s`` per unit of cosine).
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False, straight_through: bool = False):
        super().__init__()
        if easy_margin and straight_through:
            raise HyperfaceError("ArcFace's easy margin has no straight-through form (arcface_torch has neither together)")
        self.s, self.m, self.easy_margin, self.straight_through = float(s), float(m), bool(easy_margin), bool(straight_through)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.threshold = math.cos(math.pi - self.m)  # cos(theta) above this <=> theta < pi - m
        self.linear_penalty = math.sin(math.pi - self.m) * self.m

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        cosine = cosine.float().clamp(-1.0, 1.0)
        mask = _target_mask(labels, cosine.shape[1])
        target = _target_column(cosine, labels)
        if self.straight_through:
            with torch.no_grad():
                shifted = torch.cos(torch.acos(target) + self.m)
            logits = torch.where(mask, target + (shifted - target.detach()), cosine)  # value: shifted; gradient: 1
            return logits * self.s
        sine = torch.sqrt((1.0 - target * target).clamp_min(1e-12))
        with_margin = target * self.cos_m - sine * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            with_margin = torch.where(target > 0, with_margin, target)
        else:
            with_margin = torch.where(target > self.threshold, with_margin, target - self.linear_penalty)
        logits = torch.where(mask, with_margin.to(cosine.dtype), cosine)
        return logits * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, easy_margin={self.easy_margin}, straight_through={self.straight_through}"


class CosFaceMargin(nn.Module):
    """Additive cosine margin: target logit ``s * (cos(theta) - m)``."""

    def __init__(self, s: float = 64.0, m: float = 0.4):
        super().__init__()
        self.s, self.m = float(s), float(m)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        cosine = cosine.float()
        mask = _target_mask(labels, cosine.shape[1])
        return (cosine - self.m * mask.to(cosine.dtype)) * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class AdaFaceMargin(nn.Module):
    """Feature-norm-adaptive margin (AdaFace), following the authors' reference head.

    ``norms`` are the L2 norms of the *un-normalised* embeddings (image-quality proxy). Per
    training batch they are clipped to [0.001, 100] and detached; their mean and (unbiased) std
    update the EMA buffers ``batch_mean``/``batch_std`` (initial 20 and 100, as in the reference)
    *before* ``z`` is computed. High-norm (good quality) samples get ``z > 0``: a larger angular
    margin and a smaller additive one; low-norm samples the opposite. All cosines are clamped to
    ``[-1 + eps, 1 - eps]`` and the target angle to ``[eps, pi - eps]`` (eps=1e-3) for stable
    ``acos`` gradients. The EMA only moves in ``train()`` mode.
    """

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01, eps: float = 1e-3):
        super().__init__()
        self.s, self.m, self.h, self.t_alpha, self.eps = float(s), float(m), float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """``z`` per sample (updating the EMA first when training)."""
        safe_norms = norms.detach().float().clamp(0.001, 100.0)
        if self.training:
            with torch.no_grad():
                mean = safe_norms.mean()
                std = safe_norms.std() if safe_norms.numel() > 1 else torch.zeros_like(mean)
                self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * mean)
                self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * std)
        z = (safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h
        return z.clamp(-1.0, 1.0)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        if norms is None:
            raise ValueError("AdaFaceMargin needs the embedding norms")
        cosine = cosine.float().clamp(-1.0 + self.eps, 1.0 - self.eps)
        z = self.margin_scaler(norms)
        mask = _target_mask(labels, cosine.shape[1])
        target = _target_column(cosine, labels)
        z_rows = z[:, None]
        theta = torch.acos(target)
        theta_m = (theta - self.m * z_rows).clamp(self.eps, math.pi - self.eps)
        with_margin = torch.cos(theta_m) - (self.m + self.m * z_rows)
        logits = torch.where(mask, with_margin, cosine)
        return logits * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"


#: How the class centres start (``hyperface train --head-init``).
HEAD_INITS = ("normal", "unit")


def init_centres(num_classes: int, embedding_size: int, init: str = "normal") -> torch.Tensor:
    """A ``(num_classes, embedding_size)`` tensor of starting class centres, drawn from torch's
    global RNG (seed it first).

    ``normal``: N(0, 0.01) entries, as arcface_torch's partial FC (a centre's norm is about
    ``0.01 * sqrt(embedding_size)``, 0.23 at 512). ``unit``: AdaFace's head, whose kernel is
    ``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)``: entries uniform in [-1, 1), each centre then
    scaled to L2 norm 1 (renorm's scaling to 1e-5 and back, as a division by the norm).
    """
    if init not in HEAD_INITS:
        raise HyperfaceError(f"unknown --head-init {init!r}: choose one of {', '.join(HEAD_INITS)}")
    if init == "normal":
        return torch.normal(0.0, 0.01, (num_classes, embedding_size))
    centres = torch.empty(num_classes, embedding_size).uniform_(-1.0, 1.0)
    return centres.div_(centres.norm(dim=1, keepdim=True))


#: ArcFace's gradient through the margin: the formula's own, or arcface_torch's straight-through.
MARGIN_GRADIENTS = ("exact", "straight-through")


def build_margin(name: str, *, s: float | None = None, m: float | None = None, gradient: str = "exact") -> nn.Module:
    """``arcface`` (s=64, m=0.5), ``cosface`` (s=64, m=0.4) or ``adaface`` (s=64, m=0.4, h=0.333).

    ``gradient="straight-through"`` (ArcFace only) is current arcface_torch's margin."""
    key = name.lower()
    if key not in MARGINS:
        raise HyperfaceError(f"unknown loss {name!r}: choose one of {', '.join(MARGINS)}")
    if gradient not in MARGIN_GRADIENTS:
        raise HyperfaceError(f"unknown --margin-gradient {gradient!r}: choose one of {', '.join(MARGIN_GRADIENTS)}")
    kwargs = {k: v for k, v in (("s", s), ("m", m)) if v is not None}
    if gradient != "exact":
        if key != "arcface":
            raise HyperfaceError(f"--margin-gradient {gradient} is for --loss arcface (the other margins are used as they are)")
        kwargs["straight_through"] = True
    return {"arcface": ArcFaceMargin, "cosface": CosFaceMargin, "adaface": AdaFaceMargin}[key](**kwargs)


class ClassifierHead(nn.Module):
    """All class centres on one device; ``forward(embeddings, labels) -> loss`` (mean CE).

    The straightforward head: one ``(num_classes, embedding_size)`` weight, cosine logits,
    margin, ``F.cross_entropy``. Used as the reference for :class:`PartialFC` and by the benchmark's
    plain baseline loop.
    """

    def __init__(self, margin: nn.Module, embedding_size: int, num_classes: int, *, init: str = "normal"):
        super().__init__()
        self.margin = margin
        self.weight = nn.Parameter(init_centres(num_classes, embedding_size, init))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norms = embeddings.float().norm(dim=1)
        cosine = F.linear(F.normalize(embeddings), F.normalize(self.weight)).float()
        return self.margin(cosine.clamp(-1.0, 1.0), labels, norms)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels)


# --- distributed pieces --------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over ranks and returns this rank's part.

    Every rank scores the *whole* global batch against its own class shard, so the gradient of an
    embedding is the sum of the contributions of all shards. It is then multiplied by the world
    size because DDP *averages* the backbone gradients over ranks (as insightface's AllGather does):
    the backbone ends up with the gradient of the global-batch mean loss.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch] * dist.get_world_size()


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy where each rank holds some columns of the logits.

    Rows whose label is -1 have their target on another rank. Max, sum of exponentials and the
    per-row loss are all-reduced, so every rank gets the same global loss; the gradient w.r.t. the
    local logits is ``(softmax - onehot) / rows`` computed locally (no collective in backward).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, distributed: bool) -> torch.Tensor:  # type: ignore[override]
        logits = logits.float()
        row_max = logits.max(dim=1, keepdim=True).values
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max)
        denom = exp.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(denom, op=dist.ReduceOp.SUM)
        prob = exp / denom
        # log-softmax of the target from the shifted logit, not log(prob): prob underflows at s=64.
        mask = _target_mask(labels, logits.shape[1])
        target_shifted = torch.where(labels >= 0, _target_column(logits - row_max, labels).squeeze(1), 0.0)
        if distributed:
            dist.all_reduce(target_shifted, op=dist.ReduceOp.SUM)
        ctx.save_for_backward(prob, mask)
        # The exact cross-entropy. arcface_torch logs -log(prob.clamp_min(1e-30)), which caps each
        # row at 69.08: its logged loss can read lower than ours; the gradients are the same.
        return (torch.log(denom.squeeze(1)) - target_shifted).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        prob, mask = ctx.saved_tensors
        grad_logits = (prob - mask.to(prob.dtype)) * (grad / prob.shape[0])
        return grad_logits, None, None


def class_shard(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) of ``rank``'s shard; shards differ in size by at most 1."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


class PartialFC(nn.Module):
    """Class centres sharded over DDP ranks, with sampled negatives (partial FC).

    Args:
        margin: an ArcFace/CosFace/AdaFace margin module.
        embedding_size, num_classes: the global problem size.
        sample_rate: fraction of this rank's centres scored per step (all classes present in the
            global batch are always kept; random others fill up to ``int(rate * shard)``).
            1.0 = full softmax. 0.1-0.3 is typical for 1M+ identities.
        rank, world_size: default to the initialised process group (or 0/1).
        interclass_filtering: above 0, a non-target centre whose cosine to a sample exceeds it is
            taken for the same identity under another label: its logit is set to cosine 0 with no
            gradient (arcface_torch's ``interclass_filtering_threshold``; for sets with duplicated
            or colliding identities). 0 (default) = off.
        init: how this rank's centres start, from torch's global RNG (:func:`init_centres`):
            ``normal`` (arcface_torch's, default) or ``unit`` (AdaFace's unit-norm centres). The
            trainer seeds that RNG per rank, so the shards differ and each is reproducible.

    ``forward(embeddings, labels, generator=None) -> loss``: ``embeddings`` are this rank's
    un-normalised features (B, D), ``labels`` global class ids (B,). Under DDP both are all-gathered
    so every rank sees the global batch. ``generator`` drives negative sampling (the trainer seeds
    one per step, so resumed runs sample identically).

    Like insightface's PartialFC, the centres are *not* replicated across ranks: wrap only the
    backbone in DDP, never this module, and checkpoint each rank's shard.
    """

    def __init__(
        self,
        margin: nn.Module,
        embedding_size: int,
        num_classes: int,
        *,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
        interclass_filtering: float = 0.0,
        init: str = "normal",
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise HyperfaceError(f"--partial-fc sample rate must be in (0, 1], got {sample_rate}")
        if not 0.0 <= interclass_filtering < 1.0:
            raise HyperfaceError(f"--interclass-filtering must be in [0, 1) (a cosine; 0 = off), got {interclass_filtering}")
        self.interclass_filtering = float(interclass_filtering)
        if num_classes < 2:
            raise HyperfaceError(f"training needs at least 2 classes, got {num_classes}")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if num_classes < self.world_size:
            raise HyperfaceError(f"{num_classes} classes cannot be sharded over {self.world_size} ranks")
        self.margin = margin
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.class_start, self.num_local = class_shard(self.num_classes, self.rank, self.world_size)
        self.sample_rate = float(sample_rate)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))  # partial_fc_v2's int(), rounds down
        self.weight = nn.Parameter(init_centres(self.num_local, self.embedding_size, init))

    def sample(
        self, local_labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Pick the centres to score: (sorted centre indices or None for all, remapped labels)."""
        if self.num_sample >= self.num_local or not self.training:
            return None, local_labels
        positive = torch.unique(local_labels[local_labels >= 0])
        if positive.numel() >= self.num_sample:
            index = positive  # more positives than the budget: keep them all, no negatives
        else:
            device = self.weight.device
            gen_device = generator.device if generator is not None else device
            score = torch.rand(self.num_local, generator=generator, device=gen_device).to(device)
            score[positive] = 2.0  # positives always win
            index = torch.topk(score, k=self.num_sample).indices.sort().values
        remapped = torch.full_like(local_labels, -1)
        valid = local_labels >= 0
        remapped[valid] = torch.searchsorted(index, local_labels[valid])
        return index, remapped

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        distributed = self.world_size > 1
        labels = labels.long().view(-1)
        if distributed:
            embeddings = _GatherWithGrad.apply(embeddings)
            gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(gathered, labels)
            labels = torch.cat(gathered)
        local = labels - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        index, local = self.sample(local, generator)
        weight = self.weight if index is None else self.weight[index]
        norms = embeddings.float().norm(dim=1)
        cosine = F.linear(F.normalize(embeddings), F.normalize(weight)).float().clamp(-1.0, 1.0)
        if self.interclass_filtering > 0:
            with torch.no_grad():  # no host sync: the sample's own column is masked by a scatter
                own = torch.zeros_like(cosine, dtype=torch.bool)
                own.scatter_(1, local.clamp(min=0).view(-1, 1), (local >= 0).view(-1, 1))
                dirty = (cosine > self.interclass_filtering) & ~own  # a sample's own centre is never filtered
            cosine = cosine.masked_fill(dirty, 0.0)
        logits = self.margin(cosine, local, norms)
        return _ShardedCrossEntropy.apply(logits, local, distributed)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, shard=[{self.class_start}, {self.class_start + self.num_local}), "
            f"sample_rate={self.sample_rate}, rank={self.rank}/{self.world_size}"
            + (f", interclass_filtering={self.interclass_filtering}" if self.interclass_filtering else "")
        )


__all__ = [
    "HEAD_INITS",
    "MARGINS",
    "MARGIN_GRADIENTS",
    "AdaFaceMargin",
    "ArcFaceMargin",
    "ClassifierHead",
    "CosFaceMargin",
    "PartialFC",
    "build_margin",
    "class_shard",
    "init_centres",
]
