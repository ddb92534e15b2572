"""Reading the QR label on an outlet door: the scanned text, or a photo of the label.

A phone camera hands over text; a technician's laptop may only have a photo (PNG, JPEG...), which
zxing-cpp decodes. Either way the text must be a canonical powerbox label (docs/protocol.md §4),
or the user learns what is wrong with it. Pillow's and zxing's errors stay in this module.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import zxingcpp
from PIL import Image, UnidentifiedImageError

from phone_client.errors import LabelError
from protocol import gatt
from protocol.errors import MessageError

# A label photo needs nowhere near this; refusing bigger images keeps a bad file from eating memory.
MAX_IMAGE_PIXELS = 40_000_000


def label_from_text(text: str) -> gatt.QrLabel:
    """A label from its text, as a camera or a typing user gives it (surrounding spaces allowed)."""
    try:
        return gatt.QrLabel.decode(text.strip())
    except MessageError as exc:
        raise LabelError(f"not a powerbox label ({exc.detail}): {text.strip()[:60]!r}") from None


def label_from_image(path: Path) -> gatt.QrLabel:
    """The one powerbox label in a photo or image file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise LabelError(f"{path} is too large an image for a label photo")
                image = opened.convert("L")
    except FileNotFoundError:
        raise LabelError(f"no such file: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LabelError(f"{path} is not an image this phone can read") from None
    except (OSError, ValueError) as exc:
        raise LabelError(f"cannot read the image {path}: {exc}") from None
    try:
        found = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode))
    except (ValueError, RuntimeError) as exc:
        raise LabelError(f"cannot decode {path}: {exc}") from None
    labels: dict[str, gatt.QrLabel] = {}
    others = 0
    for barcode in found:
        try:
            label = gatt.QrLabel.decode(barcode.text.strip())
        except MessageError:
            others += 1
            continue
        labels[label.encode()] = label
    if len(labels) == 1:
        return next(iter(labels.values()))
    if len(labels) > 1:
        raise LabelError(f"{path} shows {len(labels)} different labels: photograph only one")
    if others:
        raise LabelError(f"{path} shows a QR code, but not a powerbox label")
    raise LabelError(f"no QR code found in {path}: photograph the label closer and straight on")


def read_label(text_or_path: str) -> gatt.QrLabel:
    """What a user typed: the label's text, or the path of a photo of it."""
    candidate = text_or_path.strip()
    if candidate.startswith(gatt.QR_PREFIX + ":"):
        return label_from_text(candidate)
    path = Path(candidate).expanduser()
    if path.is_file():
        return label_from_image(path)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"):
        raise LabelError(f"no such file: {path}")
    return label_from_text(candidate)
