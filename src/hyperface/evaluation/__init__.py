"""Evaluation of face-recognition models on real benchmarks, with the literature's exact protocols.

- :mod:`hyperface.evaluation.verification`: insightface ``.bin`` sets (LFW, CFP-FP, AgeDB-30, CALFW,
  CPLFW): restricted-unpickler loading and the 10-fold accuracy protocol.
- :mod:`hyperface.evaluation.ijb`: IJB-B / IJB-C template-based 1:1 verification (TAR at FAR).
"""

from hyperface.evaluation.verification import (
    VerificationResult,
    evaluate_bin,
    evaluate_embeddings,
    load_bin,
    read_bin,
)

__all__ = ["VerificationResult", "evaluate_bin", "evaluate_embeddings", "load_bin", "read_bin"]
