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

import os as _os

__version__ = "0.1.0"

#: Largest image decoded (pixels), Pillow's own error limit: a 400 KB PNG can unpack to 20000 x 20000
#: (1.2 GB), so a few in a folder of photos would exhaust memory. OpenCV reads its limit once, when
#: it is first imported; hyperface imports OpenCV only after this line. An explicit setting wins.
MAX_IMAGE_PIXELS = 178_956_970
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
