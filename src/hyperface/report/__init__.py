"""Dataset reports: intra/inter-class statistics, identity consistency and leakage, with plots.

Input is what ``hyperface embed`` writes for a dataset (embeddings + index) and the dataset itself
(for labels); see :func:`run_report` and, for arrays already in memory, :func:`dataset_stats`.
"""

from hyperface.report.pipeline import format_report, labels_for_embeddings, run_report
from hyperface.report.stats import DatasetStats, dataset_stats

__all__ = ["DatasetStats", "dataset_stats", "format_report", "labels_for_embeddings", "run_report"]
