"""Training stage: iResNet + ArcFace/CosFace/AdaFace (partial FC) on hyperface datasets.

- :func:`train` / :class:`TrainConfig`: the training loop (single device or torchrun DDP),
  exact resume, periodic verification, insightface-compatible export.
- :mod:`hyperface.training.losses`: margins and heads.
- :mod:`hyperface.training.data`: augmentation, dataset wrapper, resumable sampler.
- :func:`export_backbone`: a checkpoint -> insightface ``backbone.pth`` or ONNX.
- :func:`plot_metrics`: a run's ``metrics.jsonl`` as ``metrics.png``.
"""

from hyperface.training.checkpoint import export_backbone, load_backbone
from hyperface.training.plots import plot_metrics
from hyperface.training.trainer import TrainConfig, TrainResult, learning_rate, train

__all__ = ["TrainConfig", "TrainResult", "export_backbone", "learning_rate", "load_backbone", "plot_metrics", "train"]
