"""hyperface: privacy-friendly synthetic face-recognition datasets (HyperFace, ICLR 2025).

Stages, each a sub-package with a small typed API that the ``hyperface <stage>`` CLI wraps:

- :mod:`hyperface.recognition`  face recognition models, detection, alignment (``embed``)
- :mod:`hyperface.packing`      identity embeddings by hypersphere packing (``pack``)
- :mod:`hyperface.generation`   identity-conditioned image generation (``generate``)
- :mod:`hyperface.datasets`     image-folder and RecordIO readers/writers
- :mod:`hyperface.training`     iResNet training with margin losses (``train``)
- :mod:`hyperface.evaluation`   verification benchmarks (``evaluate``)
- :mod:`hyperface.report`       dataset statistics and plots (``report``)
"""

__version__ = "0.1.0"
