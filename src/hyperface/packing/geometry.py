"""Tiled kernels over all pairs: never materialise an N x N (or N x M) matrix.

Every function walks row blocks of the query set against column blocks of the base set, so memory
is O(block_rows x block_cols) whatever N and M are (1M identities against a 1M gallery included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Largest tile (elements) one kernel allocates: 32M floats = 128 MiB in float32.
TILE_ELEMENTS = 1 << 25


def _tile_rows(num_cols: int, max_rows: int = 4096) -> int:
    return int(max(1, min(max_rows, TILE_ELEMENTS // max(1, num_cols))))


@torch.no_grad()
def tiled_topk(
    queries: torch.Tensor,
    base: torch.Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    col_block: int = 1 << 16,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine neighbours in ``base`` of each row of ``queries`` (both unit rows).

    Returns (similarities (Q, k) float32 descending, indices (Q, k) int64). With ``exclude_self``
    the queries must be ``base`` itself and each row's own index is skipped.
    """
    num_q, num_b = queries.shape[0], base.shape[0]
    k_eff = min(k, num_b - (1 if exclude_self else 0))
    if k_eff < 1:
        raise ValueError("not enough base points for a neighbour")
    dtype = compute_dtype or queries.dtype
    out_sim = torch.empty(num_q, k_eff, dtype=torch.float32, device=queries.device)
    out_idx = torch.empty(num_q, k_eff, dtype=torch.int64, device=queries.device)
    col_block = min(col_block, num_b)
    rows = _tile_rows(col_block)
    base_c = base.to(dtype)
    for r0 in range(0, num_q, rows):
        q = queries[r0 : r0 + rows].to(dtype)
        best_sim = torch.full((q.shape[0], k_eff), -float("inf"), device=queries.device)
        best_idx = torch.zeros((q.shape[0], k_eff), dtype=torch.int64, device=queries.device)
        for c0 in range(0, num_b, col_block):
            sims = (q @ base_c[c0 : c0 + col_block].T).float()
            if exclude_self:
                diag_rows = torch.arange(q.shape[0], device=sims.device)
                diag_cols = diag_rows + r0 - c0
                ok = (diag_cols >= 0) & (diag_cols < sims.shape[1])
                sims[diag_rows[ok], diag_cols[ok]] = -float("inf")
            kk = min(k_eff, sims.shape[1])
            s, i = sims.topk(kk, dim=1)
            merged_s = torch.cat([best_sim, s], dim=1)
            merged_i = torch.cat([best_idx, i + c0], dim=1)
            best_sim, order = merged_s.topk(k_eff, dim=1)
            best_idx = merged_i.gather(1, order)
        out_sim[r0 : r0 + q.shape[0]] = best_sim
        out_idx[r0 : r0 + q.shape[0]] = best_idx
    return out_sim, out_idx


@dataclass
class PairStats:
    """Exact all-pairs statistics of a set of unit vectors."""

    nn_cos: torch.Tensor  # (N,) cosine to each point's nearest other point
    nn_index: torch.Tensor  # (N,) that neighbour's index
    pairs_above: dict[float, int]  # threshold -> number of unordered pairs with cosine above it
    num_pairs: int


@torch.no_grad()
def pair_stats(points: torch.Tensor, thresholds: tuple[float, ...] = (0.3, 0.4)) -> PairStats:
    """Nearest-neighbour cosine of every point and pair counts above thresholds, in float32 tiles."""
    num = points.shape[0]
    x = points.float()
    rows = _tile_rows(num)
    nn_cos = torch.empty(num, device=x.device)
    nn_index = torch.empty(num, dtype=torch.int64, device=x.device)
    counts = {t: 0 for t in thresholds}
    cols = torch.arange(num, device=x.device)
    for r0 in range(0, num, rows):
        sims = x[r0 : r0 + rows] @ x.T
        r = torch.arange(sims.shape[0], device=x.device)
        sims[r, r + r0] = -float("inf")
        best, idx = sims.max(dim=1)
        nn_cos[r0 : r0 + sims.shape[0]] = best
        nn_index[r0 : r0 + sims.shape[0]] = idx
        upper = cols[None, :] > (r + r0)[:, None]  # count each unordered pair once
        for t in thresholds:
            counts[t] += int(((sims > t) & upper).sum())
    return PairStats(nn_cos=nn_cos, nn_index=nn_index, pairs_above=counts, num_pairs=num * (num - 1) // 2)
