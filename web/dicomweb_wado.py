"""WADO-RS bodies: Accept negotiation, stored files as a streamed multipart/related answer, and
rendered frames.

Files go out as stored, byte for byte, read in CHUNK pieces while the answer is sent (a study is
never held in memory). A client that accepts only Explicit VR Little Endian gets each file in
another syntax converted by pydicom (decompressed, or re-encoded from Implicit VR or Deflate),
one instance in memory at a time; a syntax that is neither the stored one nor Explicit VR Little
Endian is not offered (406). Big Endian files are not converted (pydicom does not swap them).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from models.inference.errors import FATAL
from web.thumbnails import ThumbnailError, display_image

CHUNK = 256 * 1024
ANY = "*"
_SPLIT_COMMA = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')
_SPLIT_SEMI = re.compile(r';(?=(?:[^"]*"[^"]*")*[^"]*$)')
RENDERED = {"image/jpeg": "JPEG", "image/png": "PNG"}


class NotRenderable(Exception):
    """No image to render (no pixel data, undecodable, or no such frame)."""


def media_ranges(accept: str | None) -> list[tuple[str, dict[str, str]]]:
    """(media type, parameters) per range of an Accept header, most preferred first; q=0 ranges
    dropped; no header means anything."""
    if not accept or not accept.strip():
        return [("*/*", {})]
    ranked = []
    for n, part in enumerate(_SPLIT_COMMA.split(accept)):
        pieces = _SPLIT_SEMI.split(part)
        media = pieces[0].strip().lower()
        params = {}
        for piece in pieces[1:]:
            key, _, value = piece.partition("=")
            params[key.strip().lower()] = value.strip().strip('"').strip()
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if media and q > 0:
            ranked.append((-q, n, media, params))
    return [(media, params) for _, _, media, params in sorted(ranked)]


def wanted_syntaxes(accept: str | None) -> set[str]:
    """Transfer syntaxes acceptable for application/dicom parts ("*": as stored); empty when no
    range accepts DICOM instances in a multipart answer."""
    wanted = set()
    for media, params in media_ranges(accept):
        if media in ("*/*", "multipart/*"):
            wanted.add(ANY)
        elif media == "multipart/related" and params.get("type", "application/dicom").lower() == "application/dicom":
            wanted.add(params.get("transfer-syntax") or ANY)
        elif media == "application/dicom":     # the part's type alone, as some clients send it
            wanted.add(params.get("transfer-syntax") or ANY)
    return wanted


def convertible(stored: str) -> bool:
    """Can pydicom write this syntax as Explicit VR Little Endian?"""
    if stored in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian):
        return True
    uid = UID(stored)
    if not uid.is_compressed:
        return False            # Big Endian, or a syntax pydicom does not know
    try:
        return get_decoder(uid).is_available
    except (NotImplementedError, ValueError):
        return False


def send_syntax(stored: str, wanted: set[str]) -> str | None:
    """The syntax one instance goes out in, or None when the client accepts none it can have."""
    if ANY in wanted or stored in wanted:
        return stored
    if ExplicitVRLittleEndian in wanted and convertible(stored):
        return ExplicitVRLittleEndian
    return None


def as_explicit_little_endian(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def file_bytes(path: Path, stored: str, syntax: str) -> Iterator[bytes]:
    """A stored file in CHUNK pieces, or converted to `syntax` (Explicit VR Little Endian)."""
    if syntax == stored:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk
    else:
        yield as_explicit_little_endian(path)


def multipart(files: Iterable[tuple[Path, str, str]], boundary: str) -> Iterator[bytes]:
    """multipart/related parts of application/dicom: (path, stored syntax, syntax to send) each."""
    for path, stored, syntax in files:
        yield (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n\r\n").encode()
        yield from file_bytes(path, stored, syntax)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def rendered_type(accept: str | None) -> str | None:
    """image/jpeg or image/png, as the client prefers; JPEG for a wildcard (PS3.18's default)."""
    for media, _ in media_ranges(accept):
        if media in RENDERED:
            return media
        if media in ("*/*", "image/*"):
            return "image/jpeg"
    return None


def render(path: Path, frame: int, media: str) -> bytes:
    """One frame (1-based) as the thumbnails show it (rescale, window, MONOCHROME1 inverted,
    colour), full size, encoded as `media`. NotRenderable when there is no such image."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except FATAL:
        raise
    except Exception as error:  # noqa: BLE001
        raise NotRenderable(f"cannot read the instance: {type(error).__name__}") from None
    frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise NotRenderable(f"frame {frame}: the instance has {frames}")
    try:
        pixels = pixel_array(str(path), index=frame - 1 if frames > 1 else None)
    except FATAL:
        raise
    except BaseException as error:  # noqa: BLE001 - as in web.thumbnails: Rust decoders panic with a BaseException
        raise NotRenderable(f"cannot decode pixels: {type(error).__name__}") from None
    header.NumberOfFrames = 1           # `pixels` is the one frame asked for
    try:
        image = display_image(header, np.asarray(pixels))
    except ThumbnailError as error:
        raise NotRenderable(str(error)) from None
    except Exception as error:  # noqa: BLE001 - odd headers (bad LUTs, depths, shapes) must not be a 500
        raise NotRenderable(f"cannot render pixels: {type(error).__name__}") from None
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=RENDERED[media], **({"quality": 90} if media == "image/jpeg" else {}))
    return out.getvalue()
