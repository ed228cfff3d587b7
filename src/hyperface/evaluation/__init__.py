"""Evaluation of face-recognition models on real benchmarks, with the literature's exact protocols.

- :mod:`hyperface.evaluation.verification`: insightface ``.bin`` sets (LFW, CFP-FP, AgeDB-30, CALFW,
  CPLFW): restricted-unpickler loading and the 10-fold accuracy protocol.
- :mod:`hyperface.evaluation.ijb`: IJB-B / IJB-C template-based 1:1 verification (TAR at FAR).
- :func:`evaluate_model`: a model file on several sets at once (what ``hyperface evaluate`` runs).
- :func:`plot_evaluation`: score histograms and IJB ROC curves of one or several models' reports.

Names are imported lazily so ``hyperface --help`` (which imports ``hyperface.evaluation.cli``) stays
instant.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VerificationResult": "verification",
    "evaluate_bin": "verification",
    "evaluate_embeddings": "verification",
    "evaluate_images": "verification",
    "load_bin": "verification",
    "read_bin": "verification",
    "IJBResult": "ijb",
    "evaluate_ijb": "ijb",
    "evaluate_model": "runner",
    "format_table": "runner",
    "format_comparison": "runner",
    "plot_evaluation": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hyperface.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hyperface.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
