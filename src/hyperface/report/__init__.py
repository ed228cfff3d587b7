"""Dataset reports: intra/inter-class statistics, identity consistency and leakage, with plots.

Input is what ``hyperface embed`` writes for a dataset (embeddings + index) and the dataset itself
(for labels); see :func:`run_report` and, for arrays already in memory, :func:`dataset_stats`;
:func:`compare_reports` puts earlier reports side by side.
"""

from hyperface.report.compare import compare_reports, format_report_comparison, read_dataset_reports
from hyperface.report.pipeline import format_report, labels_for_embeddings, run_report
from hyperface.report.stats import DatasetStats, dataset_stats

__all__ = [
    "DatasetStats", "compare_reports", "dataset_stats", "format_report", "format_report_comparison", "labels_for_embeddings",
    "read_dataset_reports", "run_report",
]
