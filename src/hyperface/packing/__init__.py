"""Identity embeddings by hypersphere packing (the HyperFace optimisation).

>>> from hyperface.packing import PackConfig, pack, packing_metrics
>>> result = pack(PackConfig(num_identities=1000, dim=512, steps=500))
>>> packing_metrics(result.points)["min_angle_deg"]  # doctest: +SKIP
"""

from hyperface.packing.bounds import levenshtein_bound_deg, random_min_angle_deg
from hyperface.packing.init import binary_code_init, gallery_init, random_init
from hyperface.packing.metrics import format_metrics, packing_metrics
from hyperface.packing.pipeline import load_identities, run_pack
from hyperface.packing.solver import PackConfig, PackResult, pack

__all__ = [
    "PackConfig",
    "PackResult",
    "binary_code_init",
    "format_metrics",
    "gallery_init",
    "levenshtein_bound_deg",
    "load_identities",
    "pack",
    "packing_metrics",
    "random_init",
    "random_min_angle_deg",
    "run_pack",
]
