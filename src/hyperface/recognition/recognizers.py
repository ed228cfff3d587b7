"""Face recognizers: one interface over ONNX graphs and PyTorch iResNet backbones.

Every recognizer takes **aligned 112x112 RGB uint8** faces, shape (N, 112, 112, 3), and returns
float32 (N, D) L2-normalised embeddings. What differs between model files (RGB vs BGR, where the
``(x - 127.5) / 127.5`` normalisation happens, fixed or dynamic batch) is handled here and stated by
:meth:`Recognizer.describe`.

Supported files:

- ``*.onnx``: insightface packs (buffalo_l ``w600k_r50.onnx``, antelopev2 ``glintr100.onnx``) and
  Arc2Face's ``arcface.onnx``; run through onnxruntime on CPU or CUDA. Graphs that begin with their
  own Sub/Mul normalisation (converted MXNet models) are fed raw pixel values, as insightface does.
- ``*.pth`` / ``*.pt`` / ``*.ckpt`` / ``*.safetensors``: an insightface arcface_torch
  ``backbone.pth`` state dict (arch inferred from the keys or named), or a training checkpoint that
  is a dict holding such a state dict under ``"model"``, ``"state_dict"`` or ``"backbone"``; or an
  AdaFace IR / IR-SE network (its ``.ckpt``: ``state_dict`` with ``model.``-prefixed keys; BGR input,
  :mod:`hyperface.recognition.adaface_ir`).
- what ``hyperface train`` writes: its run folder (``backbone.pth``; the newest checkpoint while it
  still trains), ``checkpoints/step-N/`` (``backbone.safetensors``) and the ``checkpoints/latest``
  pointer file (see :func:`resolve_model_path`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hyperface.common.errors import HyperfaceError, exception_summary

#: Where pretrained recognition models come from; quoted by every "model not found" error.
MODEL_SOURCES = (
    "use an ONNX face recognizer from an insightface model pack (buffalo_l/w600k_r50.onnx or "
    "antelopev2/glintr100.onnx, from the insightface model zoo; non-commercial licence), Arc2Face's "
    "arcface.onnx (Hugging Face repo FoivosPar/Arc2Face), or an insightface arcface_torch backbone.pth"
)

ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")

# Output sizes a face-embedding head plausibly has; anything else is not a recognizer.
_MIN_EMBEDDING, _MAX_EMBEDDING = 64, 4096


class Recognizer:
    """Base class: batching, channel order, flip fusion and L2 normalisation.

    Subclasses implement :meth:`_forward` on a float32 NCHW batch already in the model's channel
    order and value range. Use :func:`load_recognizer` to build one.
    """

    #: (height, width) of the aligned face the model expects.
    input_size: tuple[int, int] = (112, 112)
    #: size of the embedding vector.
    embedding_size: int = 512
    #: channel order the *model* was trained on; :meth:`embed` always takes RGB and converts.
    channel_order: str = "RGB"

    def __init__(self, *, flip: bool = False, batch_size: int = 64, channel_order: str = "RGB"):
        channel_order = channel_order.upper()
        if channel_order not in ("RGB", "BGR"):
            raise HyperfaceError(f"channel_order must be RGB or BGR, got {channel_order!r}")
        if batch_size < 1:
            raise HyperfaceError(f"batch_size must be >= 1, got {batch_size}")
        self.flip = bool(flip)
        self.batch_size = int(batch_size)
        self.channel_order = channel_order

    # -- what subclasses provide -------------------------------------------------------------
    def _forward(self, batch_nchw_uint8: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Raw (un-normalised) float32 features for a uint8 NCHW batch in the model's channel order."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The model's input convention and identity, for manifests and logs."""
        return {
            "input_size": list(self.input_size),
            "channel_order": self.channel_order,
            "input": "aligned face, uint8 RGB (N,H,W,3) given to embed(); converted to the model's channel order",
            "embedding_size": self.embedding_size,
            "flip": self.flip,
            "batch_size": self.batch_size,
            "l2_normalisation": L2_RULE,
        }

    # -- public API ---------------------------------------------------------------------------
    def features(self, images: np.ndarray) -> np.ndarray:
        """Un-normalised float32 (N, D) features (flip-fused if ``flip``) for RGB uint8 faces."""
        images = self._check_images(images)
        out = np.empty((images.shape[0], self.embedding_size), dtype=np.float32)
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            feats = self._run(chunk)
            if self.flip:  # insightface protocol: sum the features of the image and its mirror
                feats = feats + self._run(chunk[:, :, ::-1, :])
            out[start : start + chunk.shape[0]] = feats
        return out

    def embed(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised float32 (N, D) embeddings of aligned RGB uint8 faces (N, 112, 112, 3)."""
        embeddings, good = self.embed_valid(images)
        if not good.all():
            bad = np.flatnonzero(~good)
            raise HyperfaceError(
                f"the recognizer returned NaN/inf or all-zero features for {bad.size} image(s) (e.g. "
                f"rows {bad[:5].tolist()}); check the model file and, for fp16, try fp32"
            )
        return embeddings

    def embed_valid(self, images: np.ndarray, *, model_fault_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of the images whose features are finite and non-zero, that mask). A batch of
        at least ``model_fault_batch`` images without one is the model's fault, not the images': an
        error, as from :meth:`embed` (a smaller batch may be one odd image)."""
        feats = self.features(images)
        # float64 to judge: squaring large float32 features (e.g. fp16-trained heads) must not overflow to inf
        norms = np.linalg.norm(feats.astype(np.float64), axis=1)
        good = np.isfinite(norms) & (norms >= 1e-12)
        if not good.any() and len(norms) >= model_fault_batch:
            raise HyperfaceError(
                f"the recognizer returned NaN/inf or all-zero features for all {len(norms)} image(s) of a batch; "
                "check the model file and, for fp16, try fp32"
            )
        units = np.zeros((int(good.sum()), feats.shape[1]), dtype=np.float32)
        for row, i in enumerate(np.flatnonzero(good)):
            units[row] = unit_row(feats[i])
        return units, good

    __call__ = embed

    # -- helpers ------------------------------------------------------------------------------
    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        h, w = self.input_size
        if images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise HyperfaceError(
                f"recognizer expects aligned faces of shape (N, {h}, {w}, 3) RGB uint8, got "
                f"{tuple(images.shape)}; align them first (hyperface.recognition.alignment)"
            )
        if images.dtype != np.uint8:
            raise HyperfaceError(f"recognizer expects uint8 pixels 0..255, got dtype {images.dtype}")
        return images

    def _run(self, chunk_nhwc: np.ndarray) -> np.ndarray:
        if self.channel_order == "BGR":
            chunk_nhwc = chunk_nhwc[..., ::-1]
        batch = np.ascontiguousarray(chunk_nhwc.transpose(0, 3, 1, 2))
        feats = np.asarray(self._forward(batch), dtype=np.float32)
        if feats.shape != (chunk_nhwc.shape[0], self.embedding_size):
            raise HyperfaceError(
                f"recognizer returned shape {feats.shape} for {chunk_nhwc.shape[0]} faces; expected "
                f"({chunk_nhwc.shape[0]}, {self.embedding_size}): not a face recognizer's output"
            )
        return feats

    def __repr__(self) -> str:
        info = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k not in ("input",))
        return f"{type(self).__name__}({info})"


def unit_row(feature: np.ndarray) -> np.ndarray:
    """One float32 feature divided by its L2 norm exactly as insightface's ``Face.normed_embedding``
    computes it: ``numpy.linalg.norm`` of the 1-d float32 row (a float32 dot product), then a float32
    division. A norm that overflows float32 (features above ~1e18) is taken in float64 instead."""
    feature = np.ascontiguousarray(feature, dtype=np.float32)
    norm = np.linalg.norm(feature)
    if not np.isfinite(norm) or norm <= 0:
        return (feature / np.linalg.norm(feature.astype(np.float64))).astype(np.float32)
    return feature / norm


#: Recognizer.describe()'s statement of how rows are L2-normalised (a resume compares it).
L2_RULE = "each row / numpy.linalg.norm(row) in float32 (insightface Face.normed_embedding)"


# ----------------------------------------------------------------------------------------------
# ONNX


def onnx_providers(device: str = "cpu") -> tuple[list[Any], str]:
    """onnxruntime providers for ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    device = str(device or "cpu").lower()  # also accepts a torch.device
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise HyperfaceError(
                f"--device {device}: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                "install onnxruntime-gpu matching your CUDA, or use --device cpu"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"
    raise HyperfaceError(f"unsupported --device {device!r} for an ONNX model: use auto, cpu, cuda or cuda:N")


def open_onnx_session(path: Path, device: str = "cpu", num_threads: int | None = None, what: str = ""):
    """(onnxruntime session, resolved device) for a model file; load failures are HyperfaceErrors."""
    import onnxruntime as ort

    providers, resolved = onnx_providers(device)
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers), resolved
    except Exception as exc:
        raise HyperfaceError(f"onnxruntime cannot load {what}{path}: {exc}") from exc


def graph_normalises_input(model) -> bool:
    """True when an ONNX graph subtracts a mean and scales before its first convolution.

    insightface's rule (model_zoo/arcface_onnx.py) looks for node names starting with Sub/_minus and
    Mul/_mul among the first 8 nodes (converted MXNet models); exporters that leave names empty are
    caught by also following the input through element-wise Sub/Add/Mul/Div ops up to the first
    other op.
    """
    nodes = list(model.graph.node)
    names = [n.name for n in nodes[:8]]
    if any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names):
        return True
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if not inputs:
        return False
    tensor, seen = inputs[0], set()
    passthrough = {"Identity", "Cast", "Transpose"}
    for _ in range(16):
        consumers = [n for n in nodes if tensor in n.input]
        if len(consumers) != 1:
            break
        node = consumers[0]
        if node.op_type in ("Sub", "Add"):
            seen.add("shift")
        elif node.op_type in ("Mul", "Div"):
            seen.add("scale")
        elif node.op_type not in passthrough:
            break
        tensor = node.output[0]
    return seen == {"shift", "scale"}


#: How an ONNX recognizer's input is scaled: ``blob``, insightface's ``ArcFaceONNX.get_feat`` (what
#: FaceAnalysis and Arc2Face run): ``cv2.dnn.blobFromImages(faces, 1/127.5, size, 127.5)``, whose
#: float32 arithmetic depends on the OpenCV release (most multiply by 1/127.5 rounded to float32,
#: 4.10 divides), so it is read from the installed OpenCV; ``divide``: numpy's float32
#: ``(x - 127.5) / 127.5``, as arcface_torch's ``onnx_ijbc.py`` feeds ONNX models.
ONNX_INPUTS = ("blob", "divide")


def opencv_blob_values(mean: float, std: float) -> np.ndarray:
    """float32 (256,): what ``cv2.dnn.blobFromImages(images, 1 / std, size, (mean,) * 3)`` makes of each
    grey level with the installed OpenCV (its mean and scale act on each value alone, so a table
    indexed by the pixels reproduces the blob exactly)."""
    import cv2

    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    values = cv2.dnn.blobFromImage(ramp, 1.0 / std, (256, 1), (mean, mean, mean))[0, 0, 0]
    return np.ascontiguousarray(values, dtype=np.float32)


class OnnxRecognizer(Recognizer):
    """An ONNX face recognizer run by onnxruntime (insightface packs, Arc2Face's arcface.onnx).

    Input convention: aligned RGB faces; the graph gets float32 NCHW ``(x - 127.5) / 127.5`` computed
    as insightface's ``ArcFaceONNX.get_feat`` computes it (``input_scaling="blob"``, see :data:`ONNX_INPUTS`),
    or raw 0..255 values when the graph normalises inside (see :func:`graph_normalises_input`). A graph
    with a fixed batch size (e.g. 1) is run in chunks of that size.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        flip: bool = False,
        batch_size: int = 64,
        channel_order: str = "RGB",
        num_threads: int | None = None,
        input_scaling: str = "blob",
    ):
        super().__init__(flip=flip, batch_size=batch_size, channel_order=channel_order)
        import onnx

        if input_scaling not in ONNX_INPUTS:
            raise HyperfaceError(f"ONNX input scaling must be one of {', '.join(ONNX_INPUTS)}, got {input_scaling!r}")
        self.input_scaling = input_scaling

        self.path = Path(path)
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError/ValueError subclasses for junk files
            raise HyperfaceError(f"{self.path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
        self.normalises_inside = graph_normalises_input(model)
        del model
        # insightface's ArcFaceONNX: mean 0, std 1 for graphs that normalise inside, else 127.5 / 127.5
        self._pixel_values = (
            np.arange(256, dtype=np.float32) if self.normalises_inside
            else opencv_blob_values(127.5, 127.5) if input_scaling == "blob"
            else (np.arange(256, dtype=np.float32) - 127.5) / np.float32(127.5)
        )

        self.session, self.device = open_onnx_session(self.path, device, num_threads)
        self.providers = self.session.get_providers()

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise HyperfaceError(
                f"{self.path.name} has {len(inputs)} inputs and {len(outputs)} outputs; a face recognizer has "
                f"one image input and one embedding output. Is this a detector? {MODEL_SOURCES}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        shape = list(inputs[0].shape)
        if len(shape) != 4 or not (shape[1] == 3 or shape[3] == 3):
            raise HyperfaceError(
                f"{self.path.name} takes input {inputs[0].name!r} of shape {shape}; a face recognizer takes "
                "(N, 3, 112, 112) images"
            )
        self.channels_last = shape[1] != 3 and shape[3] == 3
        hw = shape[1:3] if self.channels_last else shape[2:4]
        if not all(isinstance(d, int) for d in hw):
            hw = [112, 112]  # dynamic spatial size: the ArcFace convention
        if hw[0] != hw[1] or not 32 <= hw[0] <= 512:
            raise HyperfaceError(f"{self.path.name} takes {hw[0]}x{hw[1]} inputs, not a face recognizer's square crop")
        self.input_size = (int(hw[0]), int(hw[1]))
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

        out_shape = list(outputs[0].shape)
        if len(outputs) != 1 or len(out_shape) != 2:
            raise HyperfaceError(
                f"{self.path.name} has outputs {[(o.name, o.shape) for o in outputs]}; a face recognizer has "
                f"one (N, D) embedding output. Is this a detector or landmark model? {MODEL_SOURCES}"
            )
        dim = out_shape[1]
        if not isinstance(dim, int):  # symbolic: find out by running one blank face
            probe = np.zeros((1, 3, *self.input_size), dtype=np.uint8)
            dim = int(self._session_run(self._fixed_pad(probe)).shape[1])
        if not _MIN_EMBEDDING <= dim <= _MAX_EMBEDDING:
            raise HyperfaceError(f"{self.path.name} outputs {dim}-d vectors; not a face embedding ({_MIN_EMBEDDING}..{_MAX_EMBEDDING})")
        self.embedding_size = int(dim)

    def _fixed_pad(self, batch: np.ndarray) -> np.ndarray:
        if self.fixed_batch and batch.shape[0] < self.fixed_batch:
            pad = np.zeros((self.fixed_batch - batch.shape[0], *batch.shape[1:]), dtype=batch.dtype)
            return np.concatenate([batch, pad])
        return batch

    def _session_run(self, batch_nchw_uint8: np.ndarray) -> np.ndarray:
        x = self._pixel_values[batch_nchw_uint8]  # per grey level: the blob's values (see __init__)
        if self.channels_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or batch.shape[0]
        parts = []
        for start in range(0, batch.shape[0], step):
            part = batch[start : start + step]
            parts.append(self._session_run(self._fixed_pad(part))[: part.shape[0]])
        return np.concatenate(parts)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "onnx",
            "path": str(self.path),
            "device": self.device,
            "providers": self.providers,
            "normalisation": "raw 0..255 (graph normalises inside)" if self.normalises_inside else (
                "(x - 127.5) / 127.5 as cv2.dnn.blobFromImages computes it (insightface ArcFaceONNX.get_feat)"
                if self.input_scaling == "blob" else "(x - 127.5) / 127.5 (numpy float32 division)"
            ),
            "fixed_batch": self.fixed_batch,
            **super().describe(),
        }


# ----------------------------------------------------------------------------------------------
# PyTorch


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_backbone_state_dict(obj: Any, *, source: str = "checkpoint") -> dict:
    """Find the iResNet backbone state dict inside ``obj``.

    Accepts an insightface ``backbone.pth`` (the state dict itself) or a training checkpoint that
    nests one under ``"model"``, ``"state_dict"``, ``"backbone"`` or ``"model_state_dict"``; keys
    prefixed ``backbone.`` (a backbone + margin-head module) are selected and stripped.
    """
    for _ in range(3):
        if _is_tensor_dict(obj):
            break
        if isinstance(obj, Mapping):
            for key in ("backbone", "model", "state_dict", "model_state_dict"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise HyperfaceError(
            f"{source} holds a {type(obj).__name__}, not a state dict; save the backbone with "
            "torch.save(model.state_dict(), 'backbone.pth')"
        )
    state = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if "conv1.weight" not in state and any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if "conv1.weight" not in state and "model.input_layer.0.weight" in state:
        # AdaFace's Lightning checkpoint: the backbone under "model.", its margin head ("head.kernel") beside it
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not state:
        raise HyperfaceError(f"{source} holds no tensors; expected an iResNet backbone state dict")
    return state


def load_torch_state_dict(path: str | os.PathLike) -> dict:
    """Read tensors from a .pth/.pt/.ckpt (``weights_only=True``) or .safetensors file."""
    import torch

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from hyperface.common.io import load_safetensors

        return load_safetensors(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        lightning = (
            "; a PyTorch Lightning .ckpt (AdaFace's) may pickle its hyper-parameters as Python objects: if you "
            "trust the file, extract its weights once with python -c \"import torch; torch.save(torch.load('X.ckpt', "
            "weights_only=False)['state_dict'], 'X.pth')\" and pass X.pth" if path.suffix == ".ckpt" else ""
        )
        raise HyperfaceError(
            f"cannot read {path} as PyTorch weights ({exception_summary(exc, 200)}); "
            f"expected a state dict saved with torch.save(model.state_dict(), ...) (no pickled classes){lightning}"
        ) from exc


class TorchRecognizer(Recognizer):
    """A PyTorch backbone: an iResNet, MobileFaceNet or ViT (insightface arcface_torch ``backbone.pth``) or an AdaFace IR net.

    Input convention: aligned faces as float NCHW ``(x - 127.5) / 127.5`` (arcface_torch's and
    AdaFace's transform), in ``channel_order``. ``fp16`` runs an iResNet trunk under CUDA autocast
    like insightface's flag.
    """

    def __init__(
        self,
        model,
        *,
        device: str = "cpu",
        flip: bool = False,
        batch_size: int = 64,
        channel_order: str = "RGB",
        path: str | os.PathLike | None = None,
        arch: str | None = None,
    ):
        super().__init__(flip=flip, batch_size=batch_size, channel_order=channel_order)
        import torch

        from hyperface.common.runtime import resolve_device

        self.device = resolve_device("auto" if device is None else str(device))
        self.model = model.to(self.device).eval()
        self.path = Path(path) if path is not None else None
        self.arch = arch
        self.embedding_size = int(model.embedding_size)
        self.input_size = (112, 112)
        self._torch = torch

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.float().sub_(127.5).div_(127.5)
            return self.model(x).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": f"torch-{getattr(self.model, 'family', 'iresnet')}",
            "path": str(self.path) if self.path else None,
            "arch": self.arch,
            "device": str(self.device),
            "fp16": bool(getattr(self.model, "fp16", False)),
            "normalisation": "(x - 127.5) / 127.5",
            **super().describe(),
        }


# ----------------------------------------------------------------------------------------------
# Factory

#: What a ``hyperface train`` run folder holds: backbone.pth (written when the run ends) and
#: checkpoints/latest, a one-line text file naming the newest checkpoints/step-N/ folder.
_RUN_BACKBONES = ("backbone.pth", "backbone.safetensors")
_LATEST = "latest"
_WHAT_TO_PASS = (
    "give a model file (.onnx, backbone.pth, a checkpoint's backbone.safetensors), a hyperface train run "
    "folder, a checkpoints/step-N folder, or checkpoints/latest"
)


def _follow_latest(pointer: Path) -> Path:
    """``checkpoints/latest`` (the text file train writes) -> that checkpoint's backbone.safetensors."""
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise HyperfaceError(f"cannot read {pointer} as a checkpoint pointer ({exc}); {_WHAT_TO_PASS}") from exc
    if not name or "\n" in name or "/" in name or "\\" in name:
        raise HyperfaceError(f"{pointer} is not a checkpoints/latest pointer (one line naming a step-N folder); {_WHAT_TO_PASS}")
    backbone = pointer.parent / name / "backbone.safetensors"
    if not backbone.is_file():
        raise HyperfaceError(
            f"{pointer} names {name}, but {backbone} is missing; give another checkpoint's backbone.safetensors"
        )
    return backbone


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The model file behind what a user may pass: a model file, a train run folder (its
    backbone.pth, or its newest checkpoint while it trains), a checkpoints/ or checkpoints/step-N
    folder, or the checkpoints/latest pointer file."""
    path = Path(path)
    if not path.exists():
        raise HyperfaceError(f"face recognition model not found: {path}; {MODEL_SOURCES}")
    if path.is_dir():
        for name in _RUN_BACKBONES:  # a run folder (backbone.pth) or a checkpoint folder (backbone.safetensors)
            if (path / name).is_file():
                return path / name
        for pointer in (path / "checkpoints" / _LATEST, path / _LATEST):  # a run still training, or checkpoints/
            if pointer.is_file():
                return _follow_latest(pointer)
        candidates = sorted(p.name for p in path.iterdir() if p.suffix.lower() in ONNX_SUFFIXES + TORCH_SUFFIXES)
        hint = f" (it holds {', '.join(candidates[:5])}: pass one of them)" if candidates else f"; {_WHAT_TO_PASS}"
        raise HyperfaceError(f"{path} is a folder without backbone.pth or checkpoints/latest{hint}")
    if path.name == _LATEST and not path.suffix:
        return _follow_latest(path)
    return path


def load_recognizer(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    device: str = "cpu",
    flip: bool = False,
    batch_size: int = 64,
    channel_order: str | None = None,
    fp16: bool = False,
    num_threads: int | None = None,
    onnx_input: str = "blob",
) -> Recognizer:
    """Build a face recognizer from a model file.

    Args:
        path: ``*.onnx`` (onnxruntime) or ``*.pth``/``*.pt``/``*.ckpt``/``*.safetensors`` (iResNet), or a
            train run folder, a ``checkpoints/step-N`` folder or ``checkpoints/latest`` (:func:`resolve_model_path`).
        arch: the arch of a PyTorch file (iResNet ``r18`` ... ``r200``, MobileFaceNet ``mbf``, ViT ``vit_t`` ...
            ``vit_l``, AdaFace ``ir_50``, ``ir_se_101``, ...); inferred from the keys if None.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        flip: sum the features of each face and its horizontal mirror before normalising.
        batch_size: faces per forward pass.
        channel_order: the order the model was trained on; None: the file's own convention (insightface,
            Arc2Face and iResNet files RGB, as insightface feeds cv2 images with swapRB=True; AdaFace
            networks BGR, as its ``inference.py``). :meth:`Recognizer.embed` always takes RGB.
        fp16: PyTorch only: CUDA autocast for the trunk; refused for ONNX models and off CUDA, where
            it would do nothing (checked before the weights load).
        onnx_input: ONNX only: ``blob`` (insightface's ArcFaceONNX / FaceAnalysis arithmetic, with the
            installed OpenCV) or ``divide`` (arcface_torch's onnx_ijbc.py); see :data:`ONNX_INPUTS`.

    Returns:
        A :class:`Recognizer`; ``embed(uint8 (N,112,112,3) RGB) -> float32 (N,D)`` unit rows.
    """
    path = resolve_model_path(path)
    suffix = path.suffix.lower()
    if fp16 and suffix in ONNX_SUFFIXES:
        raise HyperfaceError(f"--fp16 is for PyTorch models (CUDA autocast); the ONNX model {path.name} runs in the "
                             "precision it was exported in: drop --fp16")
    if fp16 and suffix in TORCH_SUFFIXES:
        from hyperface.common.runtime import resolve_device

        if resolve_device("auto" if device is None else str(device)).type != "cuda":
            raise HyperfaceError("--fp16 needs a CUDA device (PyTorch autocasts to fp16 on CUDA only); "
                                 "drop --fp16 to embed on the CPU, or pass --device cuda on a machine with a GPU")
    if suffix in ONNX_SUFFIXES:
        if arch is not None:
            raise HyperfaceError("--arch applies to PyTorch iResNet files, not to ONNX models")
        return OnnxRecognizer(
            path, device=device, flip=flip, batch_size=batch_size, channel_order=channel_order or "RGB", num_threads=num_threads,
            input_scaling=onnx_input,
        )
    if suffix in TORCH_SUFFIXES:
        from hyperface.recognition.backbones import backbone_from_state_dict

        state = select_backbone_state_dict(load_torch_state_dict(path), source=str(path))
        model, name = backbone_from_state_dict(state, arch=arch, fp16=fp16)
        order = channel_order or ("BGR" if getattr(model, "family", "") == "adaface-ir" else "RGB")  # AdaFace's inference.py
        return TorchRecognizer(model, device=device, flip=flip, batch_size=batch_size, channel_order=order, path=path, arch=name)
    kind = f"type {path.suffix!r}" if path.suffix else "type (no file extension)"
    raise HyperfaceError(
        f"unknown model file {kind} for {path}: {_WHAT_TO_PASS}; {MODEL_SOURCES}"
    )


__all__ = [
    "L2_RULE",
    "MODEL_SOURCES",
    "ONNX_INPUTS",
    "OnnxRecognizer",
    "Recognizer",
    "TorchRecognizer",
    "graph_normalises_input",
    "load_recognizer",
    "load_torch_state_dict",
    "opencv_blob_values",
    "resolve_model_path",
    "select_backbone_state_dict",
    "unit_row",
]
