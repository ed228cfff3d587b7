"""Image bytes <-> RGB uint8 arrays with OpenCV (a dependency: fast, and what insightface uses)."""

from __future__ import annotations

import os

import cv2 as _cv2
import numpy as np

from hyperface.common.errors import HyperfaceError, exception_summary

#: File name extensions of the images every stage reads (image-folder datasets, ``hyperface embed``
#: folders and list files): the formats :func:`decode_image` (``cv2.imdecode``) decodes, each
#: checked by encoding an image with ``cv2.imencode`` and decoding it (tests/test_datasets.py).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm", ".jp2")


#: File signatures of the image formats datasets hold, and the name each is known by.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),  # a bare codestream (.j2k)
)


def image_encoding(data: bytes | memoryview) -> str | None:
    """The format encoded image bytes announce by their signature ("JPEG", "PNG", "GIF", "BMP", "TIFF",
    "WebP", "PNM", "JPEG 2000"), or None. The signature only: whether the rest decodes is
    :func:`decode_image`'s question."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") and head[2:3].isspace():
        return "PNM"  # PBM / PGM / PPM, text or binary
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


class ImageTooLarge(HyperfaceError):
    """An image whose pixel count is over the decoding limit (``hyperface.MAX_IMAGE_PIXELS``)."""


def jpeg_damage(data: bytes | memoryview) -> str | None:
    """libjpeg's complaint about JPEG bytes that still decode (damaged entropy-coded data, a missing
    end marker), or None. OpenCV and Pillow decode such files without telling the caller: libjpeg
    only prints a warning and fills in what it could not read. simplejpeg's strict mode raises it."""
    import simplejpeg

    data = bytes(data)
    try:  # the size first: an image over the pixel limit is OpenCV's to refuse, never unpacked here
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
    except ValueError:
        return None
    from hyperface import MAX_IMAGE_PIXELS

    if height * width > int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)):
        return None
    try:
        simplejpeg.decode_jpeg(data, strict=True)
        return None
    except ValueError as exc:
        try:  # a JPEG simplejpeg cannot read at all (not a warning): OpenCV's decode decides
            simplejpeg.decode_jpeg(data, strict=False)
        except ValueError:
            return None
        return exception_summary(exc, 120)


def decode_image(data: bytes | memoryview | np.ndarray, *, what: str = "image", strict: bool = False) -> np.ndarray:
    """Decode image bytes (a format of :data:`IMAGE_EXTENSIONS`) to an RGB uint8 (H, W, 3) array; HyperfaceError if undecodable.
    ``strict``: also refuse a JPEG that decodes only with libjpeg's warnings (:func:`jpeg_damage`;
    a second decode, for checks rather than training)."""
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buffer.size == 0:
        raise HyperfaceError(f"{what} is empty (0 bytes); the file is truncated or was not written completely")
    if strict and image_encoding(buffer[:12].tobytes()) == "JPEG":
        damage = jpeg_damage(buffer.tobytes())
        if damage is not None:
            raise HyperfaceError(f"{what} is a damaged JPEG that decodes only in part (libjpeg: {damage})")
    try:
        bgr = _cv2.imdecode(buffer, _cv2.IMREAD_COLOR)
    except _cv2.error as exc:
        if "MAX_IMAGE_PIXELS" in str(exc):
            raise ImageTooLarge(
                f"{what} is larger than {os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS')} pixels; refused to protect memory "
                "(set OPENCV_IO_MAX_IMAGE_PIXELS to allow larger images)"
            ) from None
        raise HyperfaceError(f"{what} is not a decodable JPEG/PNG image (OpenCV: {exception_summary(exc, 120)})") from None
    if bgr is None:
        raise HyperfaceError(f"{what} is not a decodable JPEG/PNG image (corrupt or truncated data)")
    return np.ascontiguousarray(_cv2.cvtColor(bgr, _cv2.COLOR_BGR2RGB), dtype=np.uint8)


def encode_image(image_rgb: np.ndarray, *, image_format: str = "jpg", quality: int = 95) -> bytes:
    """Encode an RGB uint8 (H, W, 3) array as JPEG (``quality``) or lossless PNG bytes."""
    image_rgb = check_rgb_uint8(image_rgb)
    image_format = image_format.lower().lstrip(".")
    if image_format not in ("jpg", "jpeg", "png"):
        raise HyperfaceError(f"unsupported image format {image_format!r}: use jpg or png")
    bgr = _cv2.cvtColor(image_rgb, _cv2.COLOR_RGB2BGR)
    if image_format == "png":
        ok, encoded = _cv2.imencode(".png", bgr)
    else:
        ok, encoded = _cv2.imencode(".jpg", bgr, [_cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV only fails on invalid input, checked above
        raise HyperfaceError("OpenCV failed to encode an image")
    return encoded.tobytes()


def check_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a contiguous (H, W, 3) uint8 array or raise a HyperfaceError saying why not."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise HyperfaceError(f"expected an RGB image of shape (H, W, 3), got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise HyperfaceError(f"expected a uint8 RGB image, got dtype {image.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)")
    return np.ascontiguousarray(image)


def image_size_of(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) of encoded image bytes as :func:`decode_image` returns them, read from the
    header (EXIF orientation applied) without decoding the pixels; None when the header is unreadable."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated a quarter turn: decoding swaps the sides
                width, height = height, width
    except Exception:  # any unreadable header: the caller learns the size elsewhere
        return None
    return int(height), int(width)
