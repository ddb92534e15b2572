"""QR labels from text and from photos (zxing-cpp), and the clear refusals of anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import segno
from PIL import Image

from phone_client.errors import LabelError
from phone_client.qr import label_from_image, label_from_text, read_label
from protocol import gatt, testing
from protocol.errors import ErrorCode

LABEL = gatt.QrLabel(box_id="BOX-7F3A21", outlet=2, fingerprint=gatt.box_key_fingerprint(bytes(range(32))))


def photo(path: Path, *texts: str) -> Path:
    """An image with each text as a QR code, side by side (a camera's view of a door or two)."""
    codes = []
    for index, text in enumerate(texts):
        code_path = path.with_name(f"{path.stem}-{index}.png")
        segno.make(text, error="m").save(str(code_path), scale=8, border=4)
        codes.append(Image.open(code_path).convert("L"))
    canvas = Image.new("L", (sum(c.width for c in codes) + 40, max(c.height for c in codes) + 40), 255)
    x = 20
    for code in codes:
        canvas.paste(code, (x, 20))
        x += code.width
    canvas.save(path)
    return path


def test_text_labels_decode_and_malformed_ones_are_refused() -> None:
    assert label_from_text(f"  {LABEL.encode()}\n") == LABEL
    for bad in (
        "",
        "PBX1:BOX-7F3A21:02:" + LABEL.encode().rsplit(":", 1)[1],
        "https://example.org/x",
        "PBX1:a:b",
    ):
        with pytest.raises(LabelError) as refused:
            label_from_text(bad)
        assert refused.value.code is ErrorCode.MESSAGE_MALFORMED


def test_a_photo_of_the_label_decodes(tmp_path: Path) -> None:
    assert label_from_image(photo(tmp_path / "door.png", LABEL.encode())) == LABEL
    jpeg = tmp_path / "door.jpg"
    Image.open(photo(tmp_path / "door2.png", LABEL.encode())).convert("RGB").save(jpeg, quality=85)
    assert read_label(str(jpeg)) == LABEL
    assert read_label(LABEL.encode()) == LABEL


def test_photos_without_exactly_one_label_are_refused_with_a_reason(tmp_path: Path) -> None:
    other = gatt.QrLabel(box_id="BOX-2", outlet=1, fingerprint=gatt.box_key_fingerprint(testing.seed("x")))
    with pytest.raises(LabelError, match="2 different labels"):
        label_from_image(photo(tmp_path / "two.png", LABEL.encode(), other.encode()))
    with pytest.raises(LabelError, match="not a powerbox label"):
        label_from_image(photo(tmp_path / "menu.png", "https://example.org/menu"))
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 200), 255).save(blank)
    with pytest.raises(LabelError, match="no QR code"):
        label_from_image(blank)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(LabelError, match="not an image"):
        label_from_image(not_an_image)
    with pytest.raises(LabelError, match="no such file"):
        read_label(str(tmp_path / "missing.png"))
