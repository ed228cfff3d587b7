"""Packing: known optima, bounds, tiled kernels, determinism, resume, the gallery trade-off, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperface.cli import main
from hyperface.common.errors import HyperfaceError
from hyperface.packing import (
    PackConfig,
    binary_code_init,
    levenshtein_bound_deg,
    pack,
    packing_metrics,
    random_min_angle_deg,
)
from hyperface.packing import geometry
from hyperface.packing.geometry import pair_stats, tiled_topk


def min_angle(points: np.ndarray) -> float:
    """Brute force, float64: the reference every tiled computation is checked against."""
    x = points.astype(np.float64)
    gram = x @ x.T
    np.fill_diagonal(gram, -2.0)
    return math.degrees(math.acos(min(1.0, gram.max())))


# --- known answers (simplex, cross-polytope, Sloane's tables) ----------------------------------------


@pytest.mark.parametrize(
    "num, dim, expected",
    [
        (4, 3, math.degrees(math.acos(-1 / 3))),  # tetrahedron (simplex)
        (6, 5, math.degrees(math.acos(-1 / 5))),  # simplex in 5-d
        (6, 3, 90.0),  # octahedron (cross-polytope)
        (8, 4, 90.0),  # cross-polytope in 4-d
        (12, 3, 63.4349488),  # icosahedron
    ],
)
def test_known_optima_are_reached(num, dim, expected):
    result = pack(PackConfig(num, dim, steps=1500, seed=0))
    assert result.points.shape == (num, dim)
    assert abs(min_angle(result.points) - expected) < 0.01


def test_polish_reaches_two_antipodal_points():
    """N = 2 is the simplex of two points: 180 degrees. The polish starts from float32 rows whose norms
    are 1 +- 1e-7; unnormalised, their cosine (-1.0000001) beat every unit candidate of the line
    search, so the polish never moved (179.976 deg at d = 512)."""
    result = pack(PackConfig(2, 512, steps=1000, seed=0))
    x = result.points.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert math.degrees(math.acos(max(-1.0, float(x[0] @ x[1])))) > 179.999


def test_24_cell_with_restarts():
    result = pack(PackConfig(24, 4, steps=3000, restarts=8, seed=0))
    assert abs(min_angle(result.points) - 60.0) < 0.01


def test_1000_points_in_512d_reach_90_degrees():
    result = pack(PackConfig(1000, 512, steps=1000, seed=0))
    assert min_angle(result.points) >= 89.9


# --- limits ----------------------------------------------------------------------------------------


def test_levenshtein_bound_matches_reference_values():
    assert levenshtein_bound_deg(10_000, 512) == pytest.approx(88.64, abs=0.01)
    assert levenshtein_bound_deg(100_000, 512) == pytest.approx(87.62, abs=0.01)
    assert levenshtein_bound_deg(1_000_000, 512) == pytest.approx(86.96, abs=0.01)
    # attained cases: the icosahedron, and the simplex in closed form
    assert levenshtein_bound_deg(12, 3) == pytest.approx(63.4349, abs=0.01)
    assert levenshtein_bound_deg(4, 3) == pytest.approx(109.4712, abs=1e-4)


def test_levenshtein_bound_in_low_dimensions_beats_the_area_bound():
    """In 3-d the LP needs polynomials of degree ~ 2 sqrt(N): at degree 12, N = 300 gave 20.9 degrees,
    weaker than the caps' area bound (N caps of radius a/2 fit on the sphere: 13.24)."""
    area = 2 * math.degrees(math.acos(1 - 2 / 300))
    bound = levenshtein_bound_deg(300, 3)
    assert bound < area
    result = pack(PackConfig(300, 3, steps=300, seed=0))
    assert 10.0 < min_angle(result.points) < bound  # still a bound: above a real packing


def test_random_expectation_matches_reference_and_simulation():
    assert random_min_angle_deg(10_000, 512) == pytest.approx(75.9, abs=0.05)
    assert random_min_angle_deg(100_000, 512) == pytest.approx(74.0, abs=0.05)
    assert random_min_angle_deg(1_000_000, 512) == pytest.approx(72.4, abs=0.05)
    rng = np.random.default_rng(0)
    simulated = []
    for _ in range(5):
        x = rng.standard_normal((2000, 64))
        simulated.append(min_angle(x / np.linalg.norm(x, axis=1, keepdims=True)))
    assert np.mean(simulated) == pytest.approx(random_min_angle_deg(2000, 64), abs=1.0)


def test_random_expectation_resolves_small_angles_in_low_dimensions():
    """N points uniform on a circle: the smallest of the N gaps has mean 360 / N^2 degrees. The cosine
    grid of old stopped at ~0.13 degree (d = 2, N = 1000: 0.128 instead of 0.00036)."""
    assert random_min_angle_deg(1000, 2) == pytest.approx(360 / 1000**2, rel=0.01)
    rng = np.random.default_rng(1)
    simulated = []
    for _ in range(20):
        x = rng.standard_normal((300, 3))
        simulated.append(min_angle(x / np.linalg.norm(x, axis=1, keepdims=True)))
    assert np.mean(simulated) == pytest.approx(random_min_angle_deg(300, 3), rel=0.15)


# --- initialisations -----------------------------------------------------------------------------


def test_binary_code_has_the_promised_correlations():
    x = binary_code_init(3000, 512, np.random.default_rng(1))
    assert x.shape == (3000, 512) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    gram = x.astype(np.float64) @ x.T.astype(np.float64)
    off = gram[~np.eye(len(x), dtype=bool)]
    antipodal = np.isclose(off, -1.0)
    assert antipodal.sum() == 3000  # each codeword's complement, counted from both sides
    assert np.abs(off[~antipodal]).max() <= 1 / 16 + 1e-6
    assert min_angle(x) == pytest.approx(math.degrees(math.acos(1 / 16)), abs=1e-4)


def test_binary_code_rejects_what_it_cannot_build():
    with pytest.raises(HyperfaceError, match="power-of-two"):
        binary_code_init(10, 500, np.random.default_rng(0))
    with pytest.raises(HyperfaceError, match="at most"):
        binary_code_init(2 * 8 * 8 + 1, 8, np.random.default_rng(0))


@pytest.mark.parametrize("tile", [1 << 24, 8 * 16 * 3])  # one tile; tiles of 3 rows (offsets)
def test_gallery_term_in_tiles_equals_the_direct_formula(monkeypatch, tile):
    from hyperface.packing import solver

    monkeypatch.setattr(solver, "TILE_ELEMENTS", tile)
    rng = np.random.default_rng(2)
    gallery = torch.from_numpy(anisotropic_gallery(60, 16, seed=2))
    x = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((20, 16)).astype(np.float32)), dim=1)
    cfg = PackConfig(20, 16, reg_weight=0.3).resolved(gallery.numpy())
    objective = solver._Objective(cfg, gallery, torch.float32, torch.Generator().manual_seed(0))
    objective.refresh(x)
    candidates = gallery[objective.gallery_index]  # (N, k, d), the direct form the tiles replace
    best, arg = torch.einsum("nd,nkd->nk", x, candidates).max(dim=1)
    assert objective.gallery_penalty(x) == pytest.approx(float((2 - 2 * best).mean()), abs=1e-6)
    rows = torch.arange(20)
    nearest = candidates[rows, arg]
    torch.testing.assert_close(objective._gallery_gradient(x, rows), (-2 * 0.3 / 20) * nearest)


def test_duplicate_rows_are_found_exactly():
    from hyperface.common.io import duplicate_rows

    rng = np.random.default_rng(0)
    for _ in range(20):  # few distinct values: many duplicates, many shared hashes
        x = rng.integers(0, 3, size=(300, 3)).astype(np.float32)
        _, first = np.unique(x, axis=0, return_index=True)
        expected = np.ones(len(x), dtype=bool)
        expected[first] = False
        assert np.array_equal(duplicate_rows(x), expected)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    assert not duplicate_rows(x).any()
    x[[7, 30]] = x[2]
    x[41] = -x[2]  # the same magnitudes, other bits: not a duplicate
    assert np.flatnonzero(duplicate_rows(x)).tolist() == [7, 30]


def test_gallery_init_uses_distinct_gallery_rows():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((50, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    result = pack(PackConfig(20, init="gallery", steps=1, step_angle=1e-9, polish_steps=0), gallery=gallery)
    # one tiny step: every identity is still (almost exactly) a distinct gallery row
    sims = result.points @ gallery.T
    nearest = sims.argmax(axis=1)
    assert len(set(nearest.tolist())) == 20
    assert sims.max(axis=1).min() > 0.9999


# --- tiled kernels -------------------------------------------------------------------------------


def test_tiled_kernels_equal_brute_force(monkeypatch):
    monkeypatch.setattr(geometry, "TILE_ELEMENTS", 97 * 31)  # force many ragged tiles
    rng = np.random.default_rng(3)
    x = rng.standard_normal((203, 12)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    g = rng.standard_normal((157, 12)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    xt, gt = torch.from_numpy(x), torch.from_numpy(g)

    sims, idx = tiled_topk(xt, gt, 5, col_block=40)
    ref = x @ g.T
    ref_idx = np.argsort(-ref, axis=1)[:, :5]
    assert np.array_equal(idx.numpy(), ref_idx)
    assert np.allclose(sims.numpy(), np.take_along_axis(ref, ref_idx, axis=1), atol=1e-6)

    sims, idx = tiled_topk(xt, xt, 3, exclude_self=True, col_block=50)
    self_gram = x @ x.T
    np.fill_diagonal(self_gram, -np.inf)
    assert np.array_equal(idx.numpy(), np.argsort(-self_gram, axis=1)[:, :3])

    upper = self_gram[np.triu_indices(len(x), 1)]
    for block in (None, 64, 77):  # one tile, and symmetric block pairs with a ragged last block
        stats = pair_stats(xt, (0.3, 0.4), block=block)
        assert stats.pairs_above[0.3] == int((upper > 0.3).sum())
        assert stats.pairs_above[0.4] == int((upper > 0.4).sum())
        assert np.allclose(stats.nn_cos.numpy(), self_gram.max(axis=1), atol=1e-6)
        assert np.array_equal(stats.nn_index.numpy(), self_gram.argmax(axis=1))


def test_metrics_are_exact_over_all_pairs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = packing_metrics(x)
    assert m["min_angle_deg"] == pytest.approx(min_angle(x), abs=1e-3)
    gram = x.astype(np.float64) @ x.T
    np.fill_diagonal(gram, -2)
    nn = np.degrees(np.arccos(np.clip(gram.max(axis=1), -1, 1)))
    assert m["mean_nn_angle_deg"] == pytest.approx(nn.mean(), abs=1e-3)
    assert m["pairs_above_cos_0.3"] == int((gram[np.triu_indices(300, 1)] > 0.3).sum())
    assert m["max_cosine"] == pytest.approx(gram.max(), abs=1e-5)
    assert m["nn_angle_percentiles_deg"]["50"] == pytest.approx(np.median(nn), abs=1e-3)
    # gallery terms: every point against every gallery row, brute force
    g = rng.standard_normal((50, 8))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    m = packing_metrics(x, g.astype(np.float32))
    nearest = (x.astype(np.float64) @ g.T).max(axis=1)
    assert m["gallery_similarity"]["mean"] == pytest.approx(nearest.mean(), abs=1e-5)
    assert m["gallery_similarity"]["min"] == pytest.approx(nearest.min(), abs=1e-5)
    assert m["mean_gallery_distance"] == pytest.approx(np.sqrt(2 - 2 * nearest).mean(), abs=1e-5)


# --- the optimiser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetry", ["none", "cyclic"])
def test_steps_runs_are_deterministic(symmetry):
    a = pack(PackConfig(200, 16, steps=40, seed=7, symmetry=symmetry))
    b = pack(PackConfig(200, 16, steps=40, seed=7, symmetry=symmetry))
    c = pack(PackConfig(200, 16, steps=40, seed=8, symmetry=symmetry))
    assert np.array_equal(a.points, b.points)
    assert not np.array_equal(a.points, c.points)


def test_one_candidate_is_scored_once(monkeypatch):
    """--steps 0 (and --mode stochastic) end with one candidate: one exact all-pairs pass, not two
    (each is minutes at N = 200,000 on a CPU), and the same result."""
    from hyperface.packing import solver

    calls = []
    real = solver._exact_score
    monkeypatch.setattr(solver, "_exact_score", lambda objective, x: calls.append(1) or real(objective, x))
    result = pack(PackConfig(50, 16, steps=0, seed=3))
    assert len(calls) == 1 and result.best_step == 0
    from hyperface.packing.init import initial_points

    np.testing.assert_array_equal(result.points, initial_points("random", 50, 16, np.random.default_rng(3)))
    calls.clear()
    pack(PackConfig(50, 16, steps=5, mode="stochastic", batch_size=10, polish_steps=0))
    assert len(calls) == 1


@pytest.mark.parametrize("mode", ["exact", "neighbors", "stochastic"])
def test_every_mode_improves_far_beyond_random(mode):
    num, dim = 600, 32
    result = pack(PackConfig(num, dim, steps=150, mode=mode, neighbors=64, batch_size=128, polish_steps=0, symmetry="none"))
    assert min_angle(result.points) > random_min_angle_deg(num, dim) + 12.0
    assert np.allclose(np.linalg.norm(result.points, axis=1), 1.0, atol=1e-5)


def anisotropic_gallery(num: int, dim: int, seed: int = 0) -> np.ndarray:
    """Embeddings crowded in a cone, like real faces in an FR space (far from uniform)."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(2.0, 0.2, dim)
    g = rng.standard_normal((num, dim)) * scales + 1.5 * np.eye(dim)[0]
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)


def test_reg_weight_trades_angle_for_gallery_proximity():
    gallery = anisotropic_gallery(3000, 32)
    results = {}
    for weight in (0.0, 0.5, 5.0):
        r = pack(PackConfig(300, steps=200, reg_weight=weight, init="gallery", seed=0), gallery=gallery)
        results[weight] = packing_metrics(r.points, gallery)
    angles = [results[w]["min_angle_deg"] for w in (0.0, 0.5, 5.0)]
    proximity = [results[w]["gallery_similarity"]["mean"] for w in (0.0, 0.5, 5.0)]
    assert angles[0] > angles[1] > angles[2]
    assert proximity[0] < proximity[1] < proximity[2]
    start_angle = min_angle(gallery[:300])  # gallery rows alone are badly spread
    assert angles[2] > start_angle


def test_time_budget_includes_the_polish():
    """The exact polish (N <= 2048) used to run after the budget: 300 steps, ~10 s here on top of 1 s."""
    pack(PackConfig(20, 8, steps=1, polish_steps=0, symmetry="none"))  # one-time torch set-up, off the clock
    started = time.perf_counter()
    result = pack(PackConfig(1000, 64, time_budget=1.0, symmetry="none"))
    wall = time.perf_counter() - started
    # Adam's share, then the polish until the deadline. Loose upper limits: a busy machine may
    # overrun by a step, while the bug overran by the whole polish (~10 s).
    assert 0.9 <= result.seconds <= 2.5
    assert wall < 4.0
    assert result.steps_done > 0 and min_angle(result.points) > random_min_angle_deg(1000, 64) + 10.0


@pytest.mark.parametrize("symmetry", ["none", "cyclic"])
def test_time_budget_progress_bar_counts_tenths_of_the_real_budget(monkeypatch, capsys, symmetry):
    monkeypatch.setenv("HYPERFACE_PROGRESS", "1")  # show the bar although stderr is not a terminal
    pack(PackConfig(200, 16, time_budget=1.5, symmetry=symmetry))
    err = capsys.readouterr().err
    shown = re.findall(r"\| (\S+)/(\S+) s \[", err)
    assert shown, err
    assert {total for _, total in shown} == {"1.5"}  # the budget, not round(budget) or Adam's share
    assert all(re.fullmatch(r"\d+\.\d", done) and float(done) <= 1.5 for done, _ in shown)
    assert float(shown[-1][0]) >= 1.0  # it advances through the run, polish included


@pytest.mark.parametrize("symmetry", ["none", "cyclic"])
def test_a_step_that_takes_the_whole_time_budget_is_one_warning_and_a_progress_line_at_once(monkeypatch, hyperface_log, symmetry):
    """N = 50,000, d = 512, --symmetry none on a CPU: one step took 49 s of a 5 s budget, with no word
    of it, and a log (no terminal) showed nothing for the first minute. A fake clock makes each step
    take 49 s here; fast steps (the cyclic solver's ~1000 a second) get neither line."""
    import logging

    from hyperface.common import runtime
    from hyperface.packing import cyclic, solver

    monkeypatch.setattr(runtime, "progress_enabled", lambda: False)  # a batch job's log, not a terminal
    monkeypatch.delenv("HYPERFACE_PROGRESS_SECONDS", raising=False)  # a line a minute
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    step_seconds = [49.0]
    if symmetry == "none":
        real = solver._Objective.gradient

        def gradient(self, *args):
            clock[0] += step_seconds[0]
            return real(self, *args)

        monkeypatch.setattr(solver._Objective, "gradient", gradient)
    else:
        real_smooth_max = cyclic.smooth_max

        def smooth_max(*args, **kwargs):
            clock[0] += step_seconds[0]
            return real_smooth_max(*args, **kwargs)

        monkeypatch.setattr(cyclic, "smooth_max", smooth_max)
    result = pack(PackConfig(300, 16, time_budget=5.0, symmetry=symmetry))
    assert result.steps_done == 1
    warnings = [r.getMessage() for r in hyperface_log if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("the first optimisation step took 49.0 s (N = 300, d = 16, on cpu), 980% of the 5.0 s "
                                  "--time-budget: 1 step fits, and the optimisation will take about 49.0 s, not 5.0 s")
    assert "a GPU (--device cuda)" in warnings[0] and "a larger --time-budget (about" in warnings[0]
    # pure packing of N >= 12 d with --symmetry none: auto would have made it a cyclic code
    assert ("--symmetry auto" in warnings[0]) == (symmetry == "none")
    assert [r for r in hyperface_log if r.name == "hyperface.progress"]  # after the first step, not a minute later

    hyperface_log.clear()
    step_seconds[0] = 0.01  # 500 steps in the budget: the fast path says nothing more than before
    assert pack(PackConfig(300, 16, time_budget=5.0, symmetry=symmetry, polish_steps=0)).steps_done >= 250
    assert not [r for r in hyperface_log if r.levelno >= logging.WARNING or r.name == "hyperface.progress"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    config = PackConfig(150, 24, steps=80, seed=3)
    reference = pack(config)

    def stop_at_step_30(entry):
        if entry["step"] >= 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(config, checkpoint_dir=tmp_path, checkpoint_every=1e9, log_every=1, callback=stop_at_step_30)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = pack(config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps_done == 80
    assert np.array_equal(resumed.points, reference.points)

    # only what changed is named, not the whole configuration
    with pytest.raises(HyperfaceError, match=r"other settings \(--seed 3 -> 4, --steps 80 -> 81\); use the same settings"):
        pack(PackConfig(150, 24, steps=81, seed=4), checkpoint_dir=tmp_path, resume=True)


# --- the command line ------------------------------------------------------------------------------


def run_cli(*args: str) -> int:
    return main(["pack", *args])


def test_cli_writes_a_complete_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--identities", "64", "--dim", "16", "--steps", "200", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "Levenshtein bound" in printed and "random points" in printed
    ids = np.load(out / "identities.npy")
    assert ids.shape == (64, 16) and ids.dtype == np.float32
    assert np.allclose(np.linalg.norm(ids, axis=1), 1.0, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("min_angle_deg", "max_cosine", "mean_nn_angle_deg", "levenshtein_bound_deg",
                "random_expected_min_angle_deg", "pairs_above_cos_0.3", "pairs_above_cos_0.4"):
        assert key in metrics
    assert metrics["min_angle_deg"] == pytest.approx(min_angle(ids), abs=1e-3)
    assert metrics["min_angle_deg"] <= metrics["levenshtein_bound_deg"] + 1e-6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["params"]["num_identities"] == 64
    assert "torch" in manifest["versions"]
    # the options as given (null, auto) and beside them what they came to in this run
    assert manifest["params"]["polish_steps"] is None and manifest["params"]["compute_dtype"] == "auto"
    assert manifest["resolved"] == {"device": "cpu", "compute_dtype": metrics["compute_dtype"], "polish_steps": 300}
    assert metrics["compute_dtype"] in ("float32", "bfloat16")
    assert (out / "pack.png").stat().st_size > 10_000
    assert not (out / "checkpoint.pt").exists()
    # an occupied folder is refused, --resume of a finished run is a no-op, --overwrite redoes it
    assert run_cli("--identities", "64", "--dim", "16", "--steps", "200", "--out", str(out)) == 2
    assert "--resume" in capsys.readouterr().err
    (out / "checkpoint.pt").write_bytes(b"left by a kill between the manifest and its deletion")
    identities = (out / "identities.npy").read_bytes()
    assert run_cli("--identities", "64", "--dim", "16", "--steps", "200", "--out", str(out), "--resume") == 0
    assert not (out / "checkpoint.pt").exists() and (out / "identities.npy").read_bytes() == identities
    assert run_cli("--identities", "64", "--dim", "16", "--steps", "10", "--out", str(out), "--overwrite") == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10


def test_cli_with_gallery_reports_gallery_proximity(tmp_path, hyperface_log):
    import logging

    gallery = tmp_path / "gallery.npy"
    rows = anisotropic_gallery(500, 24) * 3.0  # not unit: rows are normalised on load
    rows[400] = rows[3]  # the same face embedded twice: a warning, not a failure
    np.save(gallery, rows)
    out = tmp_path / "run"
    assert run_cli("--identities", "100", "--gallery", str(gallery), "--reg-weight", "1",
                   "--steps", "50", "--out", str(out)) == 0
    messages = [r.getMessage() for r in hyperface_log if r.levelno >= logging.WARNING]
    assert any("1 gallery row(s) repeat an earlier row exactly, e.g. rows [400]" in m for m in messages)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 < metrics["gallery_similarity"]["mean"] <= 1.0
    assert metrics["init"] == "gallery"
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["inputs"]["gallery"]["sha256"]) == 64
    assert manifest["device"] == "cpu" and manifest["params"]["device"] == "auto"


def bad_gallery(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npy"
    g = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    if kind == "nan":
        g[3, 2] = np.nan
    elif kind == "inf":
        g[5, 0] = np.inf
    elif kind == "zero":
        g[7] = 0.0
    elif kind == "1d":
        g = g[0]
    elif kind == "ints":
        g = np.arange(20 * 8).reshape(20, 8)
    if kind == "corrupt":
        path.write_bytes(b"\x93NUMPY not really")
    else:
        np.save(path, g)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [("nan", "NaN"), ("inf", "NaN/inf"), ("zero", "all-zero"), ("1d", "2-D"), ("ints", "floats"),
     ("corrupt", "truncated or corrupt")],
)
def test_cli_rejects_bad_galleries_cleanly(tmp_path, capsys, kind, message):
    out = tmp_path / "run"
    code = run_cli("--identities", "5", "--gallery", str(bad_gallery(tmp_path, kind)), "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written for a refused input


def test_steps_0_writes_the_starting_points_as_a_baseline(tmp_path):
    """The "no HyperFace optimisation" baseline: random points, or the gallery rows the init picks."""
    from hyperface.packing.init import initial_points

    assert run_cli("--identities", "300", "--dim", "16", "--steps", "0", "--no-plot", "--seed", "4", "--out", str(tmp_path / "random")) == 0
    random_points = np.load(tmp_path / "random" / "identities.npy")
    np.testing.assert_array_equal(random_points, initial_points("random", 300, 16, np.random.default_rng(4)))  # not an orbit code
    metrics = json.loads((tmp_path / "random" / "metrics.json").read_text())
    cos = random_points @ random_points.T
    np.fill_diagonal(cos, -1)
    assert metrics["min_angle_deg"] == pytest.approx(math.degrees(math.acos(cos.max())), abs=1e-3)
    gallery = anisotropic_gallery(200, 16)
    np.save(tmp_path / "g.npy", gallery)
    assert run_cli("--identities", "50", "--gallery", str(tmp_path / "g.npy"), "--steps", "0", "--no-plot", "--out", str(tmp_path / "gal")) == 0
    chosen = np.load(tmp_path / "gal" / "identities.npy")
    assert np.abs(chosen @ gallery.T).max(axis=1).min() > 1 - 1e-5  # every identity is a gallery row


@pytest.mark.parametrize(
    "args, message",
    [
        (["--identities", "1", "--dim", "8"], "at least 2"),
        (["--identities", "30", "--gallery", "{gallery}"], "at least as many gallery embeddings"),
        (["--identities", "5", "--dim", "8", "--reg-weight", "1"], "needs --gallery"),
        (["--identities", "5", "--dim", "500", "--init", "binary"], "power-of-two"),
        (["--identities", "5", "--dim", "8", "--steps", "-1"], "0 (the starting points, not optimised) or more"),
        (["--identities", "5", "--dim", "8", "--steps", "0", "--symmetry", "cyclic"], "takes --symmetry none"),
        (["--identities", "5", "--dim", "8", "--reg-weight", "-1"], ">= 0"),
        (["--identities", "5", "--dim", "8", "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_cli_rejects_bad_parameters(tmp_path, capsys, args, message):
    gallery = tmp_path / "g.npy"
    np.save(gallery, np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    args = [a.replace("{gallery}", str(gallery)) for a in args]
    code = run_cli(*args, "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the output folder is made


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "neighbors", "--neighbors", "0"], "--neighbors must be at least 1, got 0"),
        (["--mode", "neighbors", "--refresh-every", "0"], "--refresh-every must be at least 1 (steps), got 0"),
        (["--mode", "stochastic", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--mode", "stochastic", "--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
        (["--step-angle", "-1"], "--step-angle must be in (0, pi] radians, got -1.0"),
        (["--step-angle", "nan"], "--step-angle must be in (0, pi] radians, got nan"),
        (["--polish-steps", "-3"], "--polish-steps must be 0 or more, got -3"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be a positive number of seconds, got -1.0"),
        (["--time-budget", "nan"], "--time-budget must be a positive, finite number of seconds, got nan"),
        (["--time-budget", "inf"], "--time-budget must be a positive, finite number of seconds, got inf"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 2^62, got -1"),
        (["--restarts", "0"], "--restarts must be at least 1, got 0"),
        (["--temperature-start", "0"], "--temperature-start must be a positive, finite number, got 0.0"),
        (["--temperature-end", "0.9"], "--temperature-end must be in (0, --temperature-start 0.5], got 0.9"),
        (["--dim", "1"], "--dim must be at least 2, got 1"),
    ],
)
def test_cli_refuses_out_of_range_options(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    args = args if "--dim" in args else ["--dim", "16", *args]
    code = run_cli("--identities", "50", *args, "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"hyperface pack: error: {message}"  # one line: the flag, its range, the value
    assert not out.exists()  # refused before anything is written


@pytest.mark.parametrize(
    "error",
    [MemoryError("Unable to allocate 76.3 GiB for an array with shape (20000000, 512) and data type float64"),
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40960000000 bytes. Error code 12")],
)
def test_cli_out_of_memory_is_one_line_naming_the_size(tmp_path, capsys, monkeypatch, error):
    """Too many identities for the machine: numpy's MemoryError or torch's allocator error, not a traceback."""
    from hyperface.packing import solver

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(solver, "initial_points", no_memory)
    code = run_cli("--identities", "20000000", "--dim", "512", "--symmetry", "none", "--steps", "1", "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not enough memory to pack 20000000 identities in 512-d" in err and "38.1 GiB a copy" in err
    assert str(error).split(":")[0] in err


def test_cli_other_runtime_errors_keep_their_traceback(tmp_path, monkeypatch):
    from hyperface.packing import solver

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(solver, "initial_points", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_cli("--identities", "20", "--dim", "8", "--symmetry", "none", "--steps", "1", "--out", str(tmp_path / "run"))


def test_cli_resume_of_a_finished_run_with_other_settings_names_the_change(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--identities", "40", "--dim", "8", "--steps", "20", "--no-plot", "--out", str(out)]
    assert run_cli(*base) == 0
    capsys.readouterr()
    assert run_cli(*base, "--seed", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"hyperface pack: error: cannot --resume {out}: it was started with other settings "
                           "(--seed 0 -> 3); use the same settings or --overwrite")
    assert run_cli(*base, "--resume") == 0  # the same settings: nothing to do
    (out / "identities.npy").unlink()  # the result lost after the run finished: no checkpoint is left
    capsys.readouterr()
    assert run_cli(*base, "--resume") == 2
    assert "finished run but identities.npy is gone" in capsys.readouterr().err
    assert run_cli(*base, "--overwrite") == 0 and (out / "identities.npy").is_file()


def _interrupt_at_step_30(config: PackConfig, checkpoint_dir) -> None:
    """A run of ``config`` checkpointed at step 30 by an interrupt (Ctrl-C), for resume tests."""

    def stop_at_step_30(entry):
        if entry["step"] >= 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(config, checkpoint_dir=checkpoint_dir, checkpoint_every=1e9, log_every=1, callback=stop_at_step_30)


@pytest.mark.parametrize("symmetry", ["none", "cyclic"])
def test_resume_compares_compute_dtype_as_resolved_on_the_device(tmp_path, capsys, monkeypatch, symmetry):
    """--compute-dtype auto that picks float32 is float32: resuming with either is the same run. auto
    that picks bfloat16 where the run had float32 (another device, here a CPU said to have bf16) is a
    change, named with what auto picked on each side. The cyclic solver uses no --compute-dtype."""
    from hyperface.packing import solver

    monkeypatch.setattr(solver, "cpu_has_fast_bf16", lambda: False)  # auto: float32 on this CPU
    config = PackConfig(150, 24, steps=60, seed=3, symmetry=symmetry)
    reference = pack(config)
    _interrupt_at_step_30(config, tmp_path / "ckpt")
    monkeypatch.setattr(solver, "cpu_has_fast_bf16", lambda: True)  # as on a machine where auto picks bfloat16
    explicit = PackConfig(150, 24, steps=60, seed=3, symmetry=symmetry, compute_dtype="bfloat16")
    if symmetry == "none":
        with pytest.raises(HyperfaceError, match=re.escape("other settings (--compute-dtype auto (float32 on cpu) -> "
                                                           "auto (bfloat16 on cpu)); use the same settings")):
            pack(config, checkpoint_dir=tmp_path / "ckpt", resume=True)
        with pytest.raises(HyperfaceError, match=re.escape("(--compute-dtype auto (float32 on cpu) -> bfloat16)")):
            pack(explicit, checkpoint_dir=tmp_path / "ckpt", resume=True)
    else:  # the cyclic solver's precision is its own: nothing changed
        assert np.array_equal(pack(explicit, checkpoint_dir=tmp_path / "ckpt", resume=True).points, reference.points)
    monkeypatch.setattr(solver, "cpu_has_fast_bf16", lambda: False)
    as_float32 = PackConfig(150, 24, steps=60, seed=3, symmetry=symmetry, compute_dtype="float32")
    assert np.array_equal(pack(as_float32, checkpoint_dir=tmp_path / "ckpt", resume=True).points, reference.points)

    # a finished run, through the command line: the manifest's resolved compute_dtype
    out = tmp_path / "run"
    base = ["--identities", "150", "--dim", "24", "--steps", "20", "--symmetry", symmetry, "--no-plot", "--out", str(out)]
    assert run_cli(*base) == 0
    assert run_cli(*base, "--compute-dtype", "float32", "--resume") == 0  # already complete: nothing to do
    monkeypatch.setattr(solver, "cpu_has_fast_bf16", lambda: True)
    capsys.readouterr()
    assert run_cli(*base, "--resume") == (2 if symmetry == "none" else 0)
    if symmetry == "none":
        assert capsys.readouterr().err.strip() == (
            f"hyperface pack: error: cannot --resume {out}: it was started with other settings "
            "(--compute-dtype auto (float32 on cpu) -> auto (bfloat16 on cpu)); use the same settings or --overwrite")


def test_resume_with_another_gallery_is_refused_mid_run_and_after_it(tmp_path, capsys):
    gallery = anisotropic_gallery(120, 8)
    config = PackConfig(40, steps=60, seed=1)

    def stop_at_step_20(entry):
        if entry["step"] >= 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(config, gallery, checkpoint_dir=tmp_path, checkpoint_every=1e9, log_every=1, callback=stop_at_step_20)
    with pytest.raises(HyperfaceError, match="another gallery"):
        pack(config, -gallery, checkpoint_dir=tmp_path, resume=True)
    assert pack(config, gallery, checkpoint_dir=tmp_path, resume=True).steps_done == 60  # the original resumes

    # a finished run, through the command line: the gallery file's checksum in its manifest
    np.save(tmp_path / "g.npy", gallery)
    np.save(tmp_path / "other.npy", -gallery)
    out = tmp_path / "run"
    base = ["--identities", "40", "--steps", "20", "--no-plot", "--out", str(out)]
    assert run_cli(*base, "--gallery", str(tmp_path / "g.npy")) == 0
    capsys.readouterr()
    assert run_cli(*base, "--gallery", str(tmp_path / "other.npy"), "--resume") == 2
    assert "packed with another gallery" in capsys.readouterr().err
    assert run_cli(*base, "--gallery", str(tmp_path / "g.npy"), "--resume") == 0


def test_resume_of_a_checkpoint_the_chosen_solver_cannot_read_is_one_line(tmp_path, capsys):
    """A checkpoint from before --symmetry (its config_key has no symmetry) meets auto's cyclic choice,
    or a payload without the solver's fields: one line saying what to do, not a KeyError traceback."""
    out = tmp_path / "run"
    pack(PackConfig(400, 16, steps=3, symmetry="none", polish_steps=0), checkpoint_dir=out)  # leaves checkpoint.pt
    (out / ".hyperface-run").write_text("pack\n")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config_key"]["symmetry"]  # as an older hyperface wrote it
    torch.save(state, out / "checkpoint.pt")
    args = ["--identities", "400", "--dim", "16", "--steps", "3", "--polish-steps", "0", "--no-plot", "--out", str(out), "--resume"]
    assert run_cli(*args) == 2  # 400 >= 12 x 16: auto picks the cyclic solver
    err = capsys.readouterr().err
    assert "add --symmetry none to continue it" in err and len(err.strip().splitlines()) == 1
    assert run_cli(*args, "--symmetry", "none") == 0

    other = tmp_path / "other"
    other.mkdir()
    (other / ".hyperface-run").write_text("pack\n")
    torch.save({"config_key": {}, "restart": 0}, other / "checkpoint.pt")
    capsys.readouterr()
    assert run_cli("--identities", "40", "--dim", "8", "--steps", "3", "--out", str(other), "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot be continued" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_cli_resume_into_another_stages_finished_folder_is_refused(tmp_path, capsys):
    from hyperface.common.io import prepare_output_dir

    data = prepare_output_dir(tmp_path / "gen", stage="generate")
    (data / "manifest.json").write_text(json.dumps({"stage": "generate", "status": "complete", "params": {"num_identities": 16}}))
    assert run_cli("--identities", "16", "--dim", "8", "--steps", "5", "--out", str(data), "--resume") == 2
    assert "holds a `hyperface generate` run" in capsys.readouterr().err
    assert json.loads((data / "manifest.json").read_text())["stage"] == "generate"


def test_cli_takes_embeds_output_folder_as_gallery(tmp_path, capsys):
    folder = tmp_path / "embedded"  # what `hyperface embed ... --out embedded` leaves
    folder.mkdir()
    np.save(folder / "gallery.npy", anisotropic_gallery(200, 16))
    out = tmp_path / "run"
    assert run_cli("--identities", "50", "--gallery", str(folder), "--steps", "10", "--no-plot", "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["inputs"]["gallery"]["path"]) == (folder / "gallery.npy").resolve()
    assert len(manifest["inputs"]["gallery"]["sha256"]) == 64
    assert manifest["device"] == "cpu" and manifest["params"]["device"] == "auto"

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert run_cli("--identities", "50", "--gallery", str(empty), "--out", str(tmp_path / "run2")) == 2
    err = capsys.readouterr().err
    assert "is a folder without gallery.npy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run2").exists()


def test_cli_says_when_the_gallery_folder_is_an_unfinished_embed_run(tmp_path, capsys):
    folder = tmp_path / "embedded"  # `hyperface embed ... --out embedded`, killed: chunks, no gallery.npy yet
    (folder / "gallery.parts").mkdir(parents=True)
    np.savez(folder / "gallery.parts" / "chunk_000000.npz", embeddings=anisotropic_gallery(10, 16), rows=np.arange(10))
    assert run_cli("--identities", "5", "--gallery", str(folder), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "has not finished" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_refuses_unwritable_and_file_outputs(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run_cli("--identities", "5", "--dim", "8", "--out", str(blocker)) == 2
    assert "is a file" in capsys.readouterr().err
    assert run_cli("--identities", "5", "--dim", "8", "--out", str(blocker / "sub")) == 2
    assert "cannot write" in capsys.readouterr().err
    stranger = tmp_path / "user_data"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    assert run_cli("--identities", "5", "--dim", "8", "--out", str(stranger), "--overwrite") == 2
    assert (stranger / "precious.txt").read_text() == "keep me"


KILL_ARGS = ["--identities", "400", "--dim", "32", "--steps", "1500", "--seed", "1", "--no-plot",
             "--polish-steps", "0", "--symmetry", "none"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    """The run that the killed and terminated ones must reproduce after --resume."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*KILL_ARGS, "--out", str(out)) == 0
    return out


def start_pack_until_checkpoint(out: Path) -> subprocess.Popen:
    """`hyperface pack` in a child process, returned once its first checkpoint is on disk."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "hyperface", "pack", *KILL_ARGS, "--out", str(out), "--checkpoint-every", "0.05"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    return proc


def test_killed_process_resumes_without_losing_work(tmp_path, uninterrupted_run):
    """SIGKILL mid-run, then --resume: the result equals an uninterrupted run's, bit for bit."""
    out = tmp_path / "killed"
    proc = start_pack_until_checkpoint(out)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    assert (out / "checkpoint.pt").exists()
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"a checkpoint write the kill cut short")

    assert run_cli(*KILL_ARGS, "--out", str(out), "--resume") == 0
    assert np.array_equal(np.load(out / "identities.npy"), np.load(uninterrupted_run / "identities.npy"))
    assert not list(out.glob(".*.tmp"))  # killed attempts' temporaries are swept


def test_sigterm_checkpoints_and_says_how_to_resume(tmp_path, uninterrupted_run):
    """SIGTERM (a scheduler's or `kill`'s stop) acts like Ctrl-C: checkpoint, resume hint, exit 130."""
    out = tmp_path / "terminated"
    proc = start_pack_until_checkpoint(out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert not (out / "manifest.json").exists(), "the run finished before it could be stopped"
    assert proc.returncode == 130, err
    assert "stop requested" in err and "rerun with --resume" in err and "Traceback" not in err
    assert (out / "checkpoint.pt").exists()
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"a checkpoint write the kill cut short")

    assert run_cli(*KILL_ARGS, "--out", str(out), "--resume") == 0
    assert np.array_equal(np.load(out / "identities.npy"), np.load(uninterrupted_run / "identities.npy"))
    assert not list(out.glob(".*.tmp"))  # killed attempts' temporaries are swept


@pytest.mark.parametrize("symmetry, phase", [("none", "adam"), ("cyclic", "adam"), ("cyclic", "polish")])
def test_sigterm_stops_after_the_step_and_resumes_to_the_same_result(tmp_path, symmetry, phase):
    config = PackConfig(200, 16, steps=120, seed=5, symmetry=symmetry)
    reference = pack(config)

    def unhandled(signum, frame):
        raise AssertionError("pack left SIGTERM to the default handler, which kills the process")

    sent = []

    def terminate(entry):
        if not sent and entry.get("phase", "adam") == phase and (phase == "polish" or entry["step"] >= 60):
            sent.append(entry)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(KeyboardInterrupt):
            pack(config, checkpoint_dir=tmp_path, checkpoint_every=1e9, log_every=1, callback=terminate)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # pack restores the caller's handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = pack(config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps_done == 120
    assert np.array_equal(resumed.points, reference.points)


def test_interrupted_restart_sequence_resumes_to_the_same_result(tmp_path):
    config = PackConfig(60, 8, steps=50, restarts=3, seed=2)
    reference = pack(config)
    seen = []

    def stop_in_third_restart(entry):
        seen.append(entry)
        if len(seen) == 50 + 50 + 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(config, checkpoint_dir=tmp_path, checkpoint_every=1e9, log_every=1, callback=stop_in_third_restart)
    resumed = pack(config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.restart == reference.restart
    assert np.array_equal(resumed.points, reference.points)


# --- cyclic orbit codes ----------------------------------------------------------------------------


def test_cyclic_correlations_are_exactly_the_pair_cosines():
    from hyperface.packing.cyclic import expand_orbits, max_cosine

    rng = np.random.default_rng(0)
    reps = rng.standard_normal((3, 8))
    reps /= np.linalg.norm(reps, axis=1, keepdims=True)
    points = expand_orbits(reps, 24)
    for k in range(3):
        for s in range(8):
            assert np.allclose(points[8 * k + s], np.roll(reps[k], s), atol=1e-7)
    assert expand_orbits(reps, 20).shape == (20, 8)  # the last orbit cut short
    gram = points.astype(np.float64) @ points.T
    np.fill_diagonal(gram, -np.inf)
    assert max_cosine(torch.from_numpy(reps)) == pytest.approx(gram.max(), abs=1e-6)


@pytest.mark.parametrize("block_elements", [None, 16 * 2])  # one block; a block per representative
def test_orbit_pair_stats_equal_the_all_pairs_pass(monkeypatch, block_elements):
    from hyperface.packing import cyclic
    from hyperface.packing.geometry import pair_stats

    if block_elements:
        monkeypatch.setattr(cyclic, "BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(1)
    thresholds = (0.3, 0.0, -0.4)
    for num_reps, dim, num in [(5, 8, 40), (5, 8, 33), (5, 8, 39), (3, 16, 33), (1, 8, 5), (2, 8, 9), (7, 4, 25), (4, 2, 7)]:
        reps = rng.standard_normal((num_reps, dim)).astype(np.float32)
        reps /= np.linalg.norm(reps, axis=1, keepdims=True)
        dense = pair_stats(torch.from_numpy(cyclic.expand_orbits(reps, num)), thresholds)
        orbit = cyclic.orbit_pair_stats(reps, num, thresholds)
        assert orbit.pairs_above == dense.pairs_above and orbit.num_pairs == dense.num_pairs, (num_reps, dim, num)
        np.testing.assert_allclose(orbit.nn_cos.numpy(), dense.nn_cos.numpy(), atol=2e-7)


@pytest.mark.parametrize("block_elements", [None, 8 * 3])  # one autograd pass; blocks of one row, two passes
def test_cyclic_smooth_max_equals_the_dense_objective_and_its_gradient(monkeypatch, block_elements):
    from hyperface.packing import cyclic
    from hyperface.packing.cyclic import smooth_max

    if block_elements is not None:
        monkeypatch.setattr(cyclic, "BLOCK_ELEMENTS", block_elements)
        assert len(cyclic._blocks(3, 8)) == 3

    torch.manual_seed(1)
    num_reps, dim, temperature = 3, 8, 0.05
    params = torch.nn.Parameter(torch.randn(num_reps, dim, dtype=torch.float64) * 1.7)  # not unit: normalize=True
    value, peak = smooth_max(params, temperature, normalize=True)
    ours = params.grad.clone()

    dense = params.detach().clone().requires_grad_(True)
    reps = dense / dense.norm(dim=1, keepdim=True)
    points = torch.stack([torch.roll(reps[k], s) for k in range(num_reps) for s in range(dim)])
    cos = points @ points.T
    off = ~torch.eye(len(points), dtype=torch.bool)
    # every distinct correlation stands for `dim` ordered point pairs: the dense value is log(dim)*T higher
    reference = temperature * torch.logsumexp(cos[off] / temperature, 0) - temperature * math.log(dim)
    reference.backward()
    assert value == pytest.approx(reference.item(), abs=1e-10)
    assert peak == pytest.approx(cos[off].max().item(), abs=1e-12)
    assert torch.allclose(ours, dense.grad, atol=1e-10)  # a constant shift leaves the gradient alone


def test_cyclic_blocks_stay_small_on_a_cpu():
    """256 MiB blocks are fresh mmap'd memory on every evaluation on a CPU: at N = 200,000, d = 512
    faulting them in took 2.2 of 3.0 s an evaluation (0.67 s with 2^20-entry blocks)."""
    from hyperface.packing import cyclic

    num_reps, dim = 391, 512  # N = 200,000
    blocks = cyclic._blocks(num_reps, dim, torch.device("cpu"))
    assert blocks[0][0] == 0 and blocks[-1][1] == num_reps
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert max(k1 - k0 for k0, k1 in blocks) * num_reps * dim <= 1 << 20
    assert len(cyclic._blocks(num_reps, dim, "cuda")) == 2  # the GPU keeps big blocks (launches, not pages, cost there)


def test_symmetry_auto_picks_cyclic_only_for_dense_pure_packing():
    gallery = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    assert PackConfig(10_000, 512).resolved(None).symmetry == "cyclic"
    assert PackConfig(6_000, 512).resolved(None).symmetry == "none"  # N < 12 d
    assert PackConfig(300, 16, init="gallery").resolved(gallery).symmetry == "none"
    assert PackConfig(300, 16, init="binary").resolved(None).symmetry == "none"
    assert PackConfig(300, 16, mode="stochastic").resolved(None).symmetry == "none"
    for bad in (dict(init="gallery"), dict(mode="neighbors")):
        with pytest.raises(HyperfaceError, match="--symmetry cyclic is for pure packing"):
            PackConfig(300, 16, symmetry="cyclic", **bad).resolved(gallery if "init" in bad else None)
    with pytest.raises(HyperfaceError, match="unknown --symmetry"):
        PackConfig(300, 16, symmetry="dihedral").resolved(None)


def test_cyclic_beats_the_unconstrained_solver_on_a_dense_case():
    # 640 points in 32-d (20 per dimension), the same number of Adam steps; the unconstrained solver
    # with its exact polish (seeds 0-2: cyclic wins by 0.25-0.31 deg)
    cyclic = pack(PackConfig(640, 32, steps=600, seed=0, symmetry="cyclic"))
    free = pack(PackConfig(640, 32, steps=600, seed=0, symmetry="none"))
    assert cyclic.representatives.shape == (20, 32)
    assert min_angle(cyclic.points) > min_angle(free.points) + 0.15
    assert min_angle(cyclic.points) > random_min_angle_deg(640, 32) + 12.0
    assert np.allclose(np.linalg.norm(cyclic.points, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("phase", ["adam", "polish"])
def test_interrupted_cyclic_run_resumes_to_the_same_result(tmp_path, phase):
    config = PackConfig(200, 16, steps=120, seed=5, symmetry="cyclic")
    reference = pack(config)

    def stop(entry):
        if entry["phase"] == phase and (phase == "polish" or entry["step"] >= 60):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(config, checkpoint_dir=tmp_path, checkpoint_every=1e9, log_every=1, callback=stop)
    resumed = pack(config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps_done == 120
    assert np.array_equal(resumed.points, reference.points)


def test_cli_cyclic_run_writes_its_representatives(tmp_path):
    out = tmp_path / "run"
    assert run_cli("--identities", "200", "--dim", "16", "--steps", "100", "--out", str(out), "--no-plot") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["symmetry"] == "cyclic"
    reps = np.load(out / "representatives.npy")
    identities = np.load(out / "identities.npy")
    assert reps.shape == (13, 16) and identities.shape == (200, 16)
    assert np.allclose(identities[16 * 2 + 5], np.roll(reps[2], 5), atol=1e-6)
    assert metrics["min_angle_deg"] == pytest.approx(min_angle(identities), abs=1e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["polish_steps"] is None and manifest["params"]["compute_dtype"] == "auto"
    assert manifest["resolved"] == {"device": "cpu", "compute_dtype": "float32 (Adam), float64 (L-BFGS polish)", "lbfgs_polish": True}
    assert metrics["compute_dtype"] == manifest["resolved"]["compute_dtype"]


def test_cyclic_time_budget_stops_inside_an_lbfgs_stage(monkeypatch):
    """A fake clock (1 ms per reading) makes the deadline land mid-stage, deterministically."""
    from hyperface.packing import cyclic

    ticks = iter(range(10**9))
    monkeypatch.setattr(cyclic.time, "perf_counter", lambda: next(ticks) * 1e-3)
    config = PackConfig(200, 16, time_budget=1.0, symmetry="cyclic").resolved(None)
    run = cyclic.pack_cyclic(config, time_budget=1.0, seed=0, device=torch.device("cpu"))
    assert 0 < run["adam_steps"] and run["polish_stages"] < cyclic.POLISH_MAX_STAGES
    # the stage cut short is on the curve (pack.png's used to stop at the last whole stage), at the end of the budget
    last = run["history"][-1]
    assert last["phase"] == "polish" and last["partial"] is True and last["stage"] == run["polish_stages"] + 1
    assert run["history"][-2]["seconds"] < last["seconds"] <= 1.01
    assert last["min_angle_deg"] == pytest.approx(math.degrees(math.acos(run["max_cosine"])), abs=1e-4)
    assert all(not entry.get("partial") and entry["seconds"] <= 1.0 for entry in run["history"][:-1])
    points = run["points"]
    assert points.shape == (200, 16) and np.allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-5)
    gram = points.astype(np.float64) @ points.T
    np.fill_diagonal(gram, -1)
    assert run["max_cosine"] >= gram.max() - 1e-6  # 200 of the 208 orbit points: never worse than reported


def test_step_gradient_is_the_documented_objectives_gradient():
    # T*logsumexp over unordered pairs + reg_weight * mean squared distance to the nearest gallery
    # row: the Adam phase must descend this very objective, or --reg-weight means another trade-off.
    from hyperface.packing.solver import _Objective

    rng = np.random.default_rng(3)
    n, d, g, weight, temperature = 40, 8, 25, 0.7, 0.05
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    gallery = torch.from_numpy(unit(rng.standard_normal((g, d))).astype(np.float32))
    x = torch.from_numpy(unit(rng.standard_normal((n, d))).astype(np.float32))
    cfg = PackConfig(num_identities=n, dim=d, reg_weight=weight, gallery_candidates=g, mode="exact", init="random").resolved(gallery.numpy())
    objective = _Objective(cfg, gallery, torch.float32, torch.Generator().manual_seed(0))
    objective.refresh(x)
    reference = x.double().requires_grad_()
    cos = reference @ reference.T
    i, j = torch.triu_indices(n, n, 1)
    value = temperature * torch.logsumexp(cos[i, j] / temperature, 0)
    value = value + weight * (2 - 2 * (reference @ gallery.double().T).max(dim=1).values).mean()
    value.backward()
    objective.reference_cos = float(cos[i, j].max().detach())
    grad, max_cos = objective.gradient(x, temperature)
    torch.testing.assert_close(grad.double(), reference.grad, rtol=1e-4, atol=1e-6)
    assert max_cos == pytest.approx(float(cos[i, j].max().detach()), abs=1e-6)


def test_bfloat16_steps_report_the_max_cosine_in_float32():
    # Near cos = -1 every bf16 cosine rounds to -1.0; the best iterate must still be told apart.
    from hyperface.packing.solver import _Objective

    x = torch.tensor([[1.0, 0.0, 0.0], [-0.9995, 0.0316, 0.0]])
    x = x / x.norm(dim=1, keepdim=True)
    cfg = PackConfig(num_identities=2, dim=3).resolved(None)
    objective = _Objective(cfg, None, torch.bfloat16, torch.Generator().manual_seed(0))
    objective.reference_cos = -0.99  # far from 0: the GEMM stays in bfloat16
    _, max_cos = objective.gradient(x, temperature=0.5)
    assert float(x[0] @ x[1]) > -1.0 and max_cos == pytest.approx(float(x[0] @ x[1]), abs=1e-7)


def test_a_gallery_regularises_by_default_as_in_the_paper():
    gallery = np.eye(4, dtype=np.float32)
    assert PackConfig(3).resolved(gallery).reg_weight == 0.3
    assert PackConfig(3, reg_weight=0.0).resolved(gallery).reg_weight == 0.0  # start from it only
    assert PackConfig(3, dim=4).resolved(None).reg_weight == 0.0


def test_between_d_plus_1_and_2d_points_the_cross_polytope_is_kept():
    # Rankin: more than d + 1 points cannot beat 90 deg, and +-e_i (rotated) reach it; near cos 0
    # the steps run in float32, where bf16 rounding would hide which iterate is best.
    from hyperface.packing.init import orthoplex_init

    x = orthoplex_init(10, 8, np.random.default_rng(0))
    assert packing_metrics(x)["min_angle_deg"] == pytest.approx(90.0, abs=1e-4)
    assert PackConfig(10, dim=8).resolved(None).init == "orthoplex"
    assert PackConfig(9, dim=8).resolved(None).init == "random"  # simplex territory: the solver finds it
    assert PackConfig(17, dim=8).resolved(None).init == "random"
    result = pack(PackConfig(300, dim=200, steps=30))
    assert packing_metrics(result.points)["min_angle_deg"] == pytest.approx(90.0, abs=1e-4)
    with pytest.raises(HyperfaceError, match="at most 2d"):
        orthoplex_init(17, 8, np.random.default_rng(0))


def test_a_stop_after_the_last_checkpoint_resumes_to_the_same_bits(tmp_path, capsys, monkeypatch):
    """Killed or stopped while the metrics or files are written (after the final checkpoint): the
    resume must not polish the polished points again, and SIGTERM there is a clean exit 130."""
    from hyperface.packing import pipeline

    base = ["--identities", "100", "--dim", "32", "--steps", "100", "--seed", "1", "--device", "cpu", "--no-plot"]
    assert run_cli(*base, "--out", str(tmp_path / "a")) == 0
    original = pipeline.packing_report

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would, outside pack's own loops
        time.sleep(1.0)  # the handler raises here, in the main thread
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "packing_report", terminated)
    capsys.readouterr()
    assert run_cli(*base, "--out", str(tmp_path / "b")) == 130
    assert "interrupted; rerun with --resume to continue" in capsys.readouterr().err
    assert (tmp_path / "b" / "checkpoint.pt").is_file() and not (tmp_path / "b" / "identities.npy").exists()
    monkeypatch.setattr(pipeline, "packing_report", original)
    assert run_cli(*base, "--out", str(tmp_path / "b"), "--temperature-end", "0.5", "--resume") == 2
    assert "(--temperature-end 0.02 -> 0.5)" in capsys.readouterr().err  # a setting that shapes the result
    assert run_cli(*base, "--out", str(tmp_path / "b"), "--resume") == 0
    assert (tmp_path / "a" / "identities.npy").read_bytes() == (tmp_path / "b" / "identities.npy").read_bytes()


@pytest.mark.parametrize("symmetry", ["none", "cyclic"])
def test_resume_compares_polish_steps_as_the_polish_it_came_to(tmp_path, symmetry):
    """--polish-steps given as what its default came to (300 exact steps here; for a cyclic code, any
    non-zero value: its L-BFGS polish on) is the same run on --resume; a polish that differs is refused."""
    from hyperface.packing.solver import POLISH_AUTO_STEPS

    config = PackConfig(150, 24, steps=60, seed=3, symmetry=symmetry)
    reference = pack(config)
    _interrupt_at_step_30(config, tmp_path / "ckpt")
    with pytest.raises(HyperfaceError, match=re.escape("--polish-steps None -> 0")):
        pack(PackConfig(150, 24, steps=60, seed=3, symmetry=symmetry, polish_steps=0), checkpoint_dir=tmp_path / "ckpt", resume=True)
    same = PackConfig(150, 24, steps=60, seed=3, symmetry=symmetry, polish_steps=POLISH_AUTO_STEPS)
    assert np.array_equal(pack(same, checkpoint_dir=tmp_path / "ckpt", resume=True).points, reference.points)


def test_the_unconstrained_polish_is_the_last_point_of_the_history(tmp_path):
    """The exact polish (N <= 2048) ends the convergence curve at the angle the run keeps; a run
    without a polish ends at its last Adam step."""
    polished = pack(PackConfig(120, 16, steps=40, seed=5, symmetry="none"))
    last = polished.history[-1]
    assert last["phase"] == "polish" and last["step"] == 40
    assert last["min_angle_deg"] >= max(e["min_angle_deg"] for e in polished.history[:-1]) - 1e-6
    assert last["min_angle_deg"] == pytest.approx(min_angle(polished.points), abs=1e-4)
    unpolished = pack(PackConfig(120, 16, steps=40, seed=5, symmetry="none", polish_steps=0))
    assert all("phase" not in entry for entry in unpolished.history)
