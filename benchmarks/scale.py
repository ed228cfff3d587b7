"""Scale paths against the straightforward forms they replace, timed in the same run (CPU).

Each line checks that both forms give the same answer, then prints their times and the ratio:
  1. a cyclic code's pair statistics: from its orbit representatives vs the all-pairs pass;
  2. duplicate gallery rows: row hashes vs np.unique(axis=0);
  3. per-class sums for the report: chunked index_add_ vs np.add.at;
  4. the IJB template-pair file: NumPy's C reader vs the line parser;
  5. RecordIOWriter's label -> key-range table: two int64 arrays vs a dict of lists (peak memory).

    python benchmarks/scale.py                 # about 1-2 minutes on 2 cores
    python benchmarks/scale.py --points 100000 # the all-pairs pass grows as N^2: minutes more
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def line(name: str, ours: float, baseline: float, detail: str) -> None:
    print(f"{name:<34} ours {ours:8.3f} s   baseline {baseline:8.3f} s   {baseline / max(ours, 1e-9):8.1f}x   {detail}")


def cyclic_metrics(points: int, dim: int, rng: np.random.Generator) -> None:
    from hyperface.packing.cyclic import expand_orbits, num_representatives, orbit_pair_stats
    from hyperface.packing.geometry import pair_stats

    reps = rng.standard_normal((num_representatives(points, dim), dim)).astype(np.float32)
    reps /= np.linalg.norm(reps, axis=1, keepdims=True)
    ours, t_ours = timed(lambda: orbit_pair_stats(reps, points))
    dense, t_dense = timed(lambda: pair_stats(torch.from_numpy(expand_orbits(reps, points))))
    assert ours.pairs_above == dense.pairs_above
    gap = float((ours.nn_cos - dense.nn_cos).abs().max())
    assert gap < 1e-6, gap
    line("cyclic pair statistics", t_ours, t_dense, f"N={points}, d={dim}, max nn-cosine gap {gap:.1e}")


def duplicates(rows: int, dim: int, rng: np.random.Generator) -> None:
    from hyperface.common.io import duplicate_rows

    x = rng.standard_normal((rows, dim)).astype(np.float32)
    x[rng.integers(0, rows, rows // 100)] = x[0]  # 1% copies of one row
    ours, t_ours = timed(lambda: duplicate_rows(x))

    def by_sorting():
        _, first = np.unique(x, axis=0, return_index=True)
        dup = np.ones(rows, dtype=bool)
        dup[first] = False
        return dup

    dense, t_dense = timed(by_sorting)
    assert np.array_equal(ours, dense)
    line("duplicate gallery rows", t_ours, t_dense, f"{rows} x {dim}, {int(ours.sum())} duplicates")


def class_sums(rows: int, dim: int, classes: int, rng: np.random.Generator) -> None:
    from hyperface.report.stats import Classes, class_centroids

    x = rng.standard_normal((rows, dim)).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    groups = Classes.of(labels)
    (centroids, _), t_ours = timed(lambda: class_centroids(x, groups))

    def add_at():
        sums = np.zeros((len(groups.labels), dim))
        np.add.at(sums, groups.inverse, x)
        return sums / np.linalg.norm(sums, axis=1, keepdims=True)

    dense, t_dense = timed(add_at)
    assert np.allclose(centroids, dense, atol=1e-6)
    line("report class sums", t_ours, t_dense, f"{rows} x {dim}, {classes} classes")


def ijb_pairs(pairs: int, rng: np.random.Generator) -> None:
    from hyperface.evaluation.ijb import _read_columns, _read_pairs

    table = np.stack([rng.integers(1, 200_000, pairs), rng.integers(1, 200_000, pairs), rng.integers(0, 2, pairs)], axis=1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ijbc_template_pair_label.txt"
        np.savetxt(path, table, fmt="%d")
        ours, t_ours = timed(lambda: _read_pairs(path))
        dense, t_dense = timed(lambda: np.asarray([[int(v) for v in row[:3]] for row in _read_columns(path, 3)], dtype=np.int64))
    assert np.array_equal(ours, dense)
    line("IJB template-pair file", t_ours, t_dense, f"{pairs} lines (IJB-C has 15.7M)")


def label_table(labels: int) -> None:
    """RecordIOWriter's label -> key-range table: peak memory (tracemalloc), not time."""
    import tracemalloc

    from hyperface.datasets.recordio import _LabelRanges

    def peak(fill) -> tuple[object, float]:
        tracemalloc.start()
        table = fill()
        result = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        return table, result

    def arrays():
        table = _LabelRanges()
        for label in range(labels):
            table.start(label, 5 * label + 1)
            table.extend(label, 5 * label + 6)
        return table

    def dict_of_lists():  # what the writer kept before
        table: dict[int, list[int]] = {}
        for label in range(labels):
            table[label] = [5 * label + 1, 5 * label + 1]
            table[label][1] = 5 * label + 6
        return table

    ours, mb_ours = peak(arrays)
    dense, mb_dense = peak(dict_of_lists)
    assert ours.counts() == {label: end - start for label, (start, end) in dense.items()}
    print(f"{'RecordIO label table (memory)':<34} ours {mb_ours:8.1f} MB  baseline {mb_dense:8.1f} MB  "
          f"{mb_dense / max(mb_ours, 1e-9):8.1f}x   {labels} identities")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=20_000, help="cyclic code size (default 20,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rows", type=int, default=200_000, help="gallery / embedding rows (default 200,000)")
    ap.add_argument("--pairs", type=int, default=2_000_000, help="IJB pair lines (default 2M)")
    ap.add_argument("--labels", type=int, default=2_000_000, help="identities in the RecordIO label table (default 2M)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    cyclic_metrics(args.points, args.dim, rng)
    duplicates(args.rows, args.dim, rng)
    class_sums(args.rows, args.dim, args.rows // 50, rng)
    ijb_pairs(args.pairs, rng)
    label_table(args.labels)


if __name__ == "__main__":
    main()
