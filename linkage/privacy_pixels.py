"""The pixels of an exported series for the privacy audit: its first image as 8-bit gray (thumbnails),
and burned-in text found by OCR (`privacy-audit --ocr`: Tesseract, Debian's tesseract-ocr, through
pytesseract).

OCR reads the first image of each series, linked or not (a volume: its middle slice), at most 1,600 px on a side,
and counts the words Tesseract reads with confidence >= MIN_CONFIDENCE that have two or more
letters or digits. Only counts leave this module, never the text read: it may be a name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

MIN_CONFIDENCE = 70
MAX_SIDE = 1600


def first_image(paths: list[str]) -> np.ndarray:
    """The series' first image (a volume's middle slice) as uint8 gray, contrast stretched."""
    from PIL import Image
    if paths[0].lower().endswith(".dcm") or not Path(paths[0]).suffix:
        from models.inference.loading import load_series
        image = np.asarray(load_series([Path(p) for p in paths]).images[0], dtype=np.float64)
        while image.ndim > 2:
            image = image[image.shape[0] // 2] if image.shape[0] > 3 else image.mean(axis=0)
    else:
        with Image.open(paths[0]) as pic:
            image = np.asarray(pic.convert("L"), dtype=np.float64)
    lo, hi = float(image.min()), float(image.max())
    return (255 * (image - lo) / max(hi - lo, 1e-9)).astype(np.uint8)


def ocr_available() -> str | None:
    """Tesseract's version, or None when the program is not installed."""
    if shutil.which("tesseract") is None:
        return None
    import pytesseract
    try:
        return str(pytesseract.get_tesseract_version())
    except (OSError, RuntimeError, pytesseract.TesseractNotFoundError):
        return None


def words(image: np.ndarray) -> int:
    """Words Tesseract reads in an 8-bit gray image (confidence >= MIN_CONFIDENCE, >= 2 letters or digits)."""
    import pytesseract
    from PIL import Image
    pic = Image.fromarray(image)
    if max(pic.size) > MAX_SIDE:
        pic.thumbnail((MAX_SIDE, MAX_SIDE))
    data = pytesseract.image_to_data(pic, output_type=pytesseract.Output.DICT, timeout=60)
    return sum(1 for text, conf in zip(data["text"], data["conf"])
               if float(conf) >= MIN_CONFIDENCE and sum(ch.isalnum() for ch in text) >= 2)


def burned_in_text(series: list, version: str) -> dict:
    """OCR of every series' first image: how many were read, the labels and pseudonyms with text, and
    how many words each (no text)."""
    found, failed = [], 0
    for s in series:
        try:
            count = words(first_image(s.paths))
        except Exception:  # noqa: BLE001 - an image OCR cannot read is counted, the audit goes on
            failed += 1
            continue
        if count:
            found.append({"label": s.label, "pseudonym": s.pseudonym, "words": count})
    return {"checked": len(series) - failed, "unreadable": failed, "with_text": found,
            "method": f"Tesseract {version}, first image of each series, words with confidence >= {MIN_CONFIDENCE}"}
