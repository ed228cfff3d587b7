"""Margins and heads: each margin changes exactly the target logit, by the published formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hyperface.common.errors import HyperfaceError
from hyperface.training.losses import (
    AdaFaceMargin,
    ArcFaceMargin,
    ClassifierHead,
    CosFaceMargin,
    PartialFC,
    build_margin,
    class_shard,
    init_centres,
)


def _cosines(rows: int = 6, classes: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(rows, classes, generator=gen, dtype=torch.float64).float() * 1.9 - 0.95


def test_arcface_applies_angular_margin_to_target_only():
    cosine = _cosines()
    cosine[0, 2] = -0.99  # theta > pi - m: the linear continuation branch
    labels = torch.tensor([2, 0, 1, 4, 3, 2])
    out = ArcFaceMargin(s=64.0, m=0.5)(cosine, labels)
    for i in range(cosine.shape[0]):
        for j in range(cosine.shape[1]):
            c = float(cosine[i, j])
            if j == int(labels[i]):
                theta = math.acos(c)
                expected = math.cos(theta + 0.5) if theta + 0.5 <= math.pi else c - 0.5 * math.sin(math.pi - 0.5)
            else:
                expected = c
            assert float(out[i, j]) == pytest.approx(64.0 * expected, abs=1e-3), (i, j)


def test_arcface_target_logit_is_monotone_in_angle():
    # cos(theta + m) turns back up past pi - m; the continuation must keep the logit decreasing.
    theta = torch.linspace(0.01, math.pi - 0.01, 400)
    cosine = torch.cos(theta)[:, None]
    out = ArcFaceMargin()(cosine, torch.zeros(400, dtype=torch.long))[:, 0]
    assert bool((out[1:] <= out[:-1] + 1e-4).all())


def test_arcface_easy_margin_leaves_negative_cosines_alone():
    cosine = torch.tensor([[-0.3, 0.1], [0.6, 0.2]])
    out = ArcFaceMargin(s=1.0, m=0.5, easy_margin=True)(cosine, torch.tensor([0, 0]))
    assert float(out[0, 0]) == pytest.approx(-0.3, abs=1e-6)
    assert float(out[1, 0]) == pytest.approx(math.cos(math.acos(0.6) + 0.5), abs=1e-6)


def _arcface_torch_margin(logits: torch.Tensor, labels: torch.Tensor, s: float = 64.0, m: float = 0.5) -> torch.Tensor:
    """insightface arcface_torch's CombinedMarginLoss for ArcFace, as it reads: in place, under no_grad."""
    index = torch.where(labels != -1)[0]
    target_logit = logits[index, labels[index].view(-1)]
    with torch.no_grad():
        target_logit.arccos_()
        logits.arccos_()
        logits[index, labels[index].view(-1)] = target_logit + m
        logits.cos_()
    return logits * s


def test_arcface_straight_through_is_arcface_torchs_margin():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 16, generator=gen, dtype=torch.float64)
    features = torch.randn(9, 16, generator=gen, dtype=torch.float64)
    features[0] = -weight[2] + 0.1 * features[0]  # theta > pi - m for one target: no continuation branch here
    labels = torch.tensor([2, 0, 1, 4, 3, 2, 6, 5, 0])
    results = []
    for ours in (True, False):
        w, f = weight.clone().requires_grad_(), features.clone().requires_grad_()
        cosine = F.linear(F.normalize(f), F.normalize(w)).clamp(-1, 1)
        if ours:
            logits = ArcFaceMargin(straight_through=True)(cosine, labels).double()
        else:
            logits = _arcface_torch_margin(cosine, labels)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        results.append((logits.detach(), w.grad, f.grad))
    assert math.acos(float(F.normalize(features)[0] @ F.normalize(weight)[2])) > math.pi - 0.5
    for mine, theirs in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # and it is not the exact-gradient margin: same values below pi - m, other gradients
    w = weight.clone().requires_grad_()
    cosine = F.linear(F.normalize(features), F.normalize(w)).clamp(-1, 1)
    F.cross_entropy(ArcFaceMargin()(cosine, labels), labels).backward()
    assert not torch.allclose(w.grad.float(), results[0][1].float(), atol=1e-4)
    with pytest.raises(HyperfaceError, match="easy margin"):
        ArcFaceMargin(easy_margin=True, straight_through=True)
    assert isinstance(build_margin("arcface", gradient="straight-through"), ArcFaceMargin)
    with pytest.raises(HyperfaceError, match="for --loss arcface"):
        build_margin("adaface", gradient="straight-through")


def test_cosface_subtracts_margin_from_target_only():
    cosine = _cosines(seed=1)
    labels = torch.tensor([1, 1, 0, 4, 2, 3])
    out = CosFaceMargin(s=64.0, m=0.4)(cosine, labels)
    expected = cosine.clone()
    expected[torch.arange(6), labels] -= 0.4
    torch.testing.assert_close(out, 64.0 * expected)


def test_adaface_matches_formula_and_tracks_norm_statistics():
    margin = AdaFaceMargin(s=64.0, m=0.4, h=0.333, t_alpha=0.01)
    cosine = _cosines(seed=2)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    norms = torch.tensor([5.0, 10.0, 20.0, 30.0, 40.0, 150.0])  # 150 is clipped to 100
    out = margin.train()(cosine, labels, norms)

    safe = norms.clamp(0.001, 100.0).double()
    mean = 0.01 * safe.mean() + 0.99 * 20.0
    std = 0.01 * safe.std() + 0.99 * 100.0
    assert float(margin.batch_mean) == pytest.approx(float(mean), rel=1e-5)
    assert float(margin.batch_std) == pytest.approx(float(std), rel=1e-5)
    z = ((safe - mean) / (std + 1e-3) * 0.333).clamp(-1, 1)
    eps = 1e-3
    for i in range(6):
        for j in range(5):
            c = min(max(float(cosine[i, j]), -1 + eps), 1 - eps)
            if j == int(labels[i]):
                theta = min(max(math.acos(c) - 0.4 * float(z[i]), eps), math.pi - eps)
                expected = math.cos(theta) - (0.4 + 0.4 * float(z[i]))
            else:
                expected = c
            assert float(out[i, j]) == pytest.approx(64.0 * expected, abs=2e-3), (i, j)


def test_adaface_margin_scaler_grows_with_norm_and_ema_freezes_in_eval():
    margin = AdaFaceMargin()
    margin.batch_mean.fill_(20.0)
    margin.batch_std.fill_(10.0)
    margin.eval()
    z = margin.margin_scaler(torch.tensor([1.0, 20.0, 25.0, 500.0]))
    assert float(z[0]) < 0 < float(z[2])  # low norm (poor quality) -> negative z
    assert float(z[1]) == pytest.approx(0.0, abs=1e-4)
    assert float(z[3]) == pytest.approx(1.0)  # clipped
    assert float(margin.batch_mean) == 20.0 and float(margin.batch_std) == 10.0
    # The buffers are state: they round-trip through state_dict for exact resume.
    margin.train()(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([3.0, 4.0, 5.0, 6.0]))
    restored = AdaFaceMargin()
    restored.load_state_dict(margin.state_dict())
    assert float(restored.batch_mean) == float(margin.batch_mean) != 20.0


def test_adaface_high_norm_samples_get_larger_angular_margin():
    margin = AdaFaceMargin(s=1.0).eval()
    margin.batch_mean.fill_(20.0)
    margin.batch_std.fill_(5.0)
    cosine = torch.full((2, 2), 0.5)
    out = margin(cosine, torch.tensor([0, 0]), torch.tensor([10.0, 30.0]))
    # z=-0.666 (low norm): theta grows by less... the *total* target logit is easier for low norms.
    assert float(out[0, 0]) > float(out[1, 0])


def test_partial_fc_with_rate_one_equals_full_head():
    torch.manual_seed(0)
    for name in ("arcface", "cosface", "adaface"):
        full = ClassifierHead(build_margin(name), embedding_size=16, num_classes=11)
        partial = PartialFC(build_margin(name), embedding_size=16, num_classes=11, sample_rate=1.0)
        partial.weight.data.copy_(full.weight.data)
        emb = torch.randn(8, 16) * 5
        labels = torch.randint(0, 11, (8,))
        emb_a = emb.clone().requires_grad_(True)
        emb_b = emb.clone().requires_grad_(True)
        loss_full = full(emb_a, labels)
        loss_partial = partial(emb_b, labels)
        loss_full.backward()
        loss_partial.backward()
        assert float(loss_partial.detach()) == pytest.approx(float(loss_full.detach()), rel=1e-5), name
        torch.testing.assert_close(emb_b.grad, emb_a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(partial.weight.grad, full.weight.grad, rtol=1e-4, atol=1e-7)


def test_partial_fc_sampling_keeps_positives_and_matches_subset_softmax():
    torch.manual_seed(0)
    partial = PartialFC(CosFaceMargin(), embedding_size=8, num_classes=40, sample_rate=0.25)
    emb = torch.randn(6, 8)
    labels = torch.tensor([3, 3, 17, 39, 0, 22])
    gen = torch.Generator().manual_seed(5)
    index, remapped = partial.sample(labels.clone(), gen)
    assert index is not None and index.numel() == 10
    assert set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index[remapped], labels)
    # The loss is the full-softmax loss restricted to the sampled centres.
    loss = partial(emb, labels, torch.Generator().manual_seed(5))
    sub = F.linear(F.normalize(emb), F.normalize(partial.weight[index]))
    logits = CosFaceMargin()(sub, remapped)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, remapped).detach()), rel=1e-5)
    # Unsampled centres receive no gradient.
    loss.backward()
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[index] = False
    assert float(partial.weight.grad[untouched].abs().sum()) == 0.0
    # In eval mode every centre is scored.
    assert partial.eval().sample(labels, gen)[0] is None


def test_interclass_filtering_zeroes_close_negatives_like_arcface_torch():
    """Negatives above the threshold get cosine 0 and no gradient; targets are never filtered."""
    torch.manual_seed(0)
    head = PartialFC(ArcFaceMargin(), embedding_size=8, num_classes=6, interclass_filtering=0.4)
    centres = F.normalize(torch.randn(6, 8), dim=1)
    centres[4] = F.normalize(centres[1] + 0.05 * torch.randn(8), dim=0)  # class 4 duplicates class 1
    head.weight.data.copy_(centres)
    emb = (centres[[1, 1, 2, 4]] * 3 + 0.2 * torch.randn(4, 8)).requires_grad_(True)
    labels = torch.tensor([1, 1, 2, 4])
    loss = head(emb, labels)
    loss.backward()
    # by hand: insightface's CombinedMarginLoss filtering, then the margin and softmax cross-entropy
    weight = centres.clone().requires_grad_(True)
    cos = F.linear(F.normalize(emb.detach()), F.normalize(weight)).clamp(-1, 1)
    dirty = cos.detach() > 0.4
    dirty[torch.arange(4), labels] = False
    assert dirty[0, 4] and dirty[1, 4] and dirty[3, 1]  # the duplicated identities are what gets filtered
    expected = F.cross_entropy(ArcFaceMargin()(cos.masked_fill(dirty, 0.0), labels), labels)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(head.weight.grad, weight.grad, rtol=1e-4, atol=1e-7)
    off = PartialFC(ArcFaceMargin(), embedding_size=8, num_classes=6)
    off.weight.data.copy_(centres)
    assert float(off(emb.detach(), labels).detach()) > float(loss.detach()) + 1  # the duplicates' pull is gone
    with pytest.raises(HyperfaceError, match="interclass-filtering must be in"):
        PartialFC(ArcFaceMargin(), 8, 6, interclass_filtering=1.0)


def test_interclass_filtering_with_sampled_centres_and_opposite_ones():
    """Under partial-FC sampling the mask uses the remapped labels; a centre far on the other side
    (cosine < -threshold) is no duplicate and keeps its logit."""
    torch.manual_seed(1)
    head = PartialFC(CosFaceMargin(), embedding_size=8, num_classes=40, sample_rate=0.25, interclass_filtering=0.4)
    emb = torch.randn(6, 8)
    labels = torch.tensor([3, 3, 17, 39, 0, 22])
    head.weight.data[9] = -F.normalize(emb[0], dim=0)  # opposite to sample 0 (centres 9 and 16 are among the sampled)
    head.weight.data[16] = F.normalize(emb[2], dim=0) + 0.01  # a duplicate of sample 2's identity under label 16
    index, remapped = head.sample(labels.clone(), torch.Generator().manual_seed(5))
    cos = F.linear(F.normalize(emb), F.normalize(head.weight.data[index])).clamp(-1, 1)
    dirty = cos > 0.4
    dirty[torch.arange(6), remapped] = False
    expected = F.cross_entropy(CosFaceMargin()(cos.masked_fill(dirty, 0.0), remapped), remapped)
    loss = head(emb, labels, torch.Generator().manual_seed(5))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    columns = index.tolist()
    assert dirty[2, columns.index(16)] and not dirty[2, columns.index(17)]  # label 17 is sample 2's own
    assert cos[0, columns.index(9)] < -0.9 and not dirty[0, columns.index(9)]
    unfiltered = PartialFC(CosFaceMargin(), embedding_size=8, num_classes=40, sample_rate=0.25)
    unfiltered.weight.data.copy_(head.weight.data)
    assert float(unfiltered(emb, labels, torch.Generator().manual_seed(5)).detach()) > float(loss.detach())


def test_partial_fc_sample_count_follows_arcface_torch():
    # partial_fc_v2: num_sample = int(rate * num_local), rounded down (ceil would give 29 and 124).
    assert PartialFC(CosFaceMargin(), 8, 100, sample_rate=0.29).num_sample == 28
    assert PartialFC(CosFaceMargin(), 8, 1000, sample_rate=0.1234).num_sample == 123


def test_unit_head_init_is_adafaces_kernel_init_and_normal_stays_arcface_torchs():
    # AdaFace's head.py, re-typed: kernel (embedding, classes) = uniform(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5),
    # applied here to the very draws init_centres makes (it lays the centres out as rows).
    torch.manual_seed(3)
    uniform = torch.empty(40, 512).uniform_(-1.0, 1.0)
    adaface_kernel = uniform.t().clone().renorm_(2, 1, 1e-5).mul_(1e5)
    torch.manual_seed(3)
    unit = init_centres(40, 512, "unit")
    torch.testing.assert_close(unit, adaface_kernel.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(40), rtol=0, atol=1e-6)
    assert not torch.equal(unit, F.normalize(torch.randn(40, 512)))  # not a normal draw normalised
    torch.manual_seed(3)
    assert torch.equal(init_centres(40, 512, "unit"), unit)  # the same seed, the same centres
    # the default is unchanged: arcface_torch's N(0, 0.01), norm ~0.01 sqrt(512) = 0.23
    torch.manual_seed(3)
    normal = PartialFC(CosFaceMargin(), 512, 40).weight.detach()
    torch.manual_seed(3)
    assert torch.equal(normal, torch.normal(0.0, 0.01, (40, 512)))
    assert 0.2 < float(normal.norm(dim=1).mean()) < 0.26
    torch.manual_seed(3)
    assert torch.equal(PartialFC(CosFaceMargin(), 512, 40, init="unit").weight.detach(), unit)
    torch.manual_seed(3)
    assert torch.equal(ClassifierHead(CosFaceMargin(), 512, 40, init="unit").weight.detach(), unit)
    with pytest.raises(HyperfaceError, match="unknown --head-init 'xavier'"):
        PartialFC(CosFaceMargin(), 512, 40, init="xavier")


def test_unit_head_init_on_partial_fc_shards_like_the_normal_one():
    """Each rank's shard is drawn from the seed and its rank, as with the normal init: reproducible,
    unit-norm, and no two ranks start with the same centres. (Neither init makes the shards of a
    two-rank run a split of the one-process head: each rank draws its own.)"""
    from hyperface.training import TrainConfig
    from hyperface.training.trainer import build_head

    def shards(init: str, seed: int = 0) -> list[torch.Tensor]:
        cfg = TrainConfig(data="d", out="o", embedding_size=16, head_init=init, seed=seed)
        return [build_head(cfg, 11, rank, 2).weight.detach() for rank in range(2)]

    unit = shards("unit")
    assert [tuple(w.shape) for w in unit] == [(6, 16), (5, 16)]  # class_shard(11, r, 2)
    for weight in unit:
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(len(weight)), rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(unit, shards("unit")))  # reproducible from the seed
    assert not torch.equal(unit[0][:5], unit[1])  # the ranks' shards are drawn apart
    assert not torch.equal(unit[0], shards("unit", seed=1)[0])
    normal = shards("normal")
    assert not torch.equal(normal[0][:5], normal[1])  # the normal init's shards: the same scheme
    assert float(normal[0].norm(dim=1).max()) < 0.1


def test_class_shards_cover_all_classes_once():
    for classes, world in ((10, 3), (7, 7), (100, 8)):
        shards = [class_shard(classes, r, world) for r in range(world)]
        covered = np.concatenate([np.arange(s, s + n) for s, n in shards])
        assert covered.tolist() == list(range(classes))


def test_bad_names_and_rates_are_refused():
    with pytest.raises(HyperfaceError, match="unknown loss"):
        build_margin("sphereface")
    with pytest.raises(HyperfaceError, match="sample rate"):
        PartialFC(ArcFaceMargin(), 8, 10, sample_rate=0.0)


_RANK_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from hyperface.training.losses import PartialFC, build_margin, class_shard
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {}
for name in ("arcface", "adaface"):
    torch.manual_seed(0)
    weight = torch.normal(0.0, 0.01, (11, 16))
    emb = torch.randn(8, 16) * 5
    labels = torch.randint(0, 11, (8,))
    head = PartialFC(build_margin(name), 16, 11, sample_rate=1.0)
    start, count = class_shard(11, rank, world)
    head.weight.data.copy_(weight[start:start + count])
    local = emb[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    loss = head(local, labels[rank * 4:(rank + 1) * 4])
    loss.backward()
    out[name] = {"loss": loss.detach(), "emb_grad": local.grad, "weight_grad": head.weight.grad,
                 "start": start, "count": count, "state": {k: v.clone() for k, v in head.state_dict().items()}}
torch.save(out, sys.argv[1] + f"/rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
# what the test checks is saved; gloo's threads can still abort the interpreter's exit ("terminate
# called without an active exception", pytorch/pytorch#179291), so leave without it
sys.stdout.flush()
__import__("os")._exit(0)
"""


def _run_two_gloo_ranks(source: str, tmp_path, *args: str) -> None:
    """Run ``source`` as a script in two processes of one gloo group (argv: tmp_path, *args)."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(source)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output.decode()[-2000:]


def test_partial_fc_sharded_over_two_ranks_equals_single_process_head(tmp_path):
    """Two gloo processes, classes sharded 6+5, global batch split 4+4: same loss and gradients."""
    _run_two_gloo_ranks(_RANK_SCRIPT, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("arcface", "adaface"):
        torch.manual_seed(0)
        weight = torch.normal(0.0, 0.01, (11, 16))
        emb = (torch.randn(8, 16) * 5).requires_grad_(True)
        labels = torch.randint(0, 11, (8,))
        full = ClassifierHead(build_margin(name), 16, 11)
        full.weight.data.copy_(weight)
        loss = full(emb, labels)
        loss.backward()
        for rank, result in enumerate(ranks):
            r = result[name]
            assert float(r["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5), (name, rank)
            # x world size: DDP averages backbone gradients, so each rank carries W x its share.
            torch.testing.assert_close(r["emb_grad"], 2 * emb.grad[rank * 4 : (rank + 1) * 4], rtol=1e-4, atol=1e-6)
            shard = slice(r["start"], r["start"] + r["count"])
            torch.testing.assert_close(r["weight_grad"], full.weight.grad[shard], rtol=1e-4, atol=1e-7)
        if name == "adaface":  # the EMA saw the global batch on both ranks
            for key in ("margin.batch_mean", "margin.batch_std"):
                torch.testing.assert_close(ranks[0][name]["state"][key], full.state_dict()[key])
                torch.testing.assert_close(ranks[1][name]["state"][key], full.state_dict()[key])


class _LinearHead(torch.nn.Module):
    """A plain softmax head with train_step's signature (no all-gather: the DDP test checks the backbone)."""

    def __init__(self, dim: int = 8, classes: int = 5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, dim) * 0.1)

    def forward(self, embeddings, labels, generator=None):
        return F.cross_entropy(embeddings @ self.weight.t(), labels)


def _tiny_backbone():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))


def test_grad_accum_steps_on_the_mean_loss_of_its_passes():
    from hyperface.training.trainer import train_step

    torch.manual_seed(0)
    model, head = _tiny_backbone(), _LinearHead()
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 5, (12,))
    reference = [p.detach().clone() for p in (*model.parameters(), *head.parameters())]
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_step(model, head, optimizer, scaler, images, labels, device=torch.device("cpu"), amp_dtype=None,
                      channels_last=False, accumulate=3)
    # by hand: three passes of 4 images, each loss / 3, gradients summed, one SGD step
    expected_loss, grads = 0.0, [torch.zeros_like(p) for p in reference]
    for part in range(3):
        weights = [p.clone().requires_grad_(True) for p in reference]
        x = (images[part * 4 : (part + 1) * 4].float() - 127.5) / 127.5
        emb = F.linear(x.flatten(1), weights[0], weights[1])
        piece = F.cross_entropy(emb @ weights[2].t(), labels[part * 4 : (part + 1) * 4]) / 3
        piece.backward()
        expected_loss += float(piece.detach())
        grads = [g + w.grad for g, w in zip(grads, weights)]
    assert float(loss) == pytest.approx(expected_loss, rel=1e-6)
    for after, before, grad in zip(params, reference, grads):
        torch.testing.assert_close(after.detach(), before - 0.5 * grad)
    # with equal parts and no BatchNorm, the mean of the three means is the mean over all 12: the same
    # step as accumulate=1 on the same images
    model2, head2 = _tiny_backbone(), _LinearHead()
    with torch.no_grad():
        for p, r in zip((*model2.parameters(), *head2.parameters()), reference):
            p.copy_(r)
    optimizer2 = torch.optim.SGD(list(model2.parameters()) + list(head2.parameters()), lr=0.5)
    train_step(model2, head2, optimizer2, scaler, images, labels, device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    for a, b in zip(params, (*model2.parameters(), *head2.parameters())):
        torch.testing.assert_close(a.detach(), b.detach())


_ACCUM_SCRIPT = r"""
import sys, torch, torch.distributed as dist, torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
from test_training_losses import _LinearHead, _tiny_backbone
from hyperface.training.trainer import train_step
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model, head = _tiny_backbone(), _LinearHead()
images = torch.randint(0, 256, (2, 12, 3, 4, 4), dtype=torch.uint8)[rank]
labels = torch.randint(0, 5, (2, 12))[rank]
ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(list(model.parameters()), lr=0.5)
train_step(ddp, head, optimizer, torch.amp.GradScaler("cpu", enabled=False), images, labels, device=torch.device("cpu"),
           amp_dtype=None, channels_last=False, accumulate=3)
torch.save({k: v.clone() for k, v in model.state_dict().items()}, sys.argv[1] + f"/rank{rank}.pt")
dist.barrier()
del ddp  # its reducer's gloo work must end before the group does
dist.destroy_process_group()
# what the test checks is saved; gloo's threads can still abort the interpreter's exit ("terminate
# called without an active exception", pytorch/pytorch#179291), so leave without it
sys.stdout.flush()
__import__("os")._exit(0)
"""


def test_grad_accum_under_ddp_all_reduces_the_summed_passes(tmp_path):
    """Two gloo ranks, three passes each: the step uses the mean over ranks of each rank's summed
    passes, and both ranks end with the same weights (no_sync only saves the first two all-reduces;
    it must not change the result)."""
    import os

    _run_two_gloo_ranks(_ACCUM_SCRIPT, tmp_path, os.path.dirname(__file__))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    model, head = _tiny_backbone(), _LinearHead()
    images = torch.randint(0, 256, (2, 12, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 5, (2, 12))
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(2):
        for part in range(3):
            model.zero_grad()
            x = (images[rank, part * 4 : (part + 1) * 4].float() - 127.5) / 127.5
            (head(model(x), labels[rank, part * 4 : (part + 1) * 4]) / 3).backward()
            grads = [g + p.grad / 2 for g, p in zip(grads, model.parameters())]  # DDP averages over the 2 ranks
    expected = {name: p.detach() - 0.5 * g for (name, p), g in zip(model.named_parameters(), grads)}
    for rank in range(2):
        for name, value in expected.items():
            torch.testing.assert_close(ranks[rank][name], value, msg=f"rank {rank} {name}")
