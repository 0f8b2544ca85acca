"""Check that an encoded data set is structurally whole, without decoding values.

Written by hand because pydicom is deliberately lenient: a data set cut short
reads back with short values and at most a warning, and pynetdicom hands us the
bytes as they arrived. A receiver that must never acknowledge a half object
needs a strict check of the element framing (tag, VR, length) alone, which is
cheap: it touches each element header once and never copies a value.

It is also where hostile input is bounded before pydicom sees it: deflated data
sets are inflated at most to `Limits.max_bytes`, the walk stops after
`Limits.max_elements` elements and `Limits.max_depth` nested sequences, and
explicit VRs must be ones the standard defines.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# The walk reads a VR as one 16-bit number (its two ASCII bytes, whatever the byte order), so
# the hot loop builds no bytes object, on bytes and on an inflated bytearray alike.
_VR_CODE = struct.Struct(">H")
_LONG_VR_CODES = {_VR_CODE.unpack(vr)[0] for vr in LONG_VRS}
_KNOWN_VR_CODES = {_VR_CODE.unpack(v.value.encode())[0] for v in VR if len(v.value) == 2}
_UN = _VR_CODE.unpack(b"UN")[0]
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
# Top-level elements that carry an image's (or spectrum's) bulk values: Float, Double Float
# and plain Pixel Data, Spectroscopy Data.
BULK_DATA = {0x7FE00008, 0x7FE00009, PIXEL_DATA, 0x56000020}
# The node reads its header tags from groups up to 0x0028 (`dicom_node.header`).
HEADER_GROUPS = 0x0028


class FramingError(ValueError):
    """The data set's element framing is broken (truncated or malformed)."""


class LimitExceeded(FramingError):
    """The data set is larger or deeper than this node accepts (a resource limit, not a defect)."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 1 << 30          # after inflation
    max_elements: int = 1_000_000     # counted at every nesting level
    max_depth: int = 32               # sequences within sequences


@dataclass
class Framing:
    """What the walk saw of the top level: the data set it walked (inflated when it was deflated)."""

    dataset: bytes | bytearray
    pixel_length: int | None = None   # defined length of Pixel Data; -1 encapsulated; None absent
    pixel_fragments: int = 0          # encapsulated: fragments after the Basic Offset Table
    bulk_data: bool = False           # any element of BULK_DATA at the top level
    elements: int = 0
    header_end: int | None = None     # offset of the first top-level element past group HEADER_GROUPS


class _Walker:
    def __init__(self, buf: bytes, implicit: bool, little: bool, limits: Limits) -> None:
        self.buf = buf
        self.implicit = implicit
        self.end = len(buf)
        self.limits = limits
        self.depth = 0
        order = "<" if little else ">"
        self.u16 = struct.Struct(order + "H")
        self.tag = struct.Struct(order + "HH")
        self.u32 = struct.Struct(order + "I")
        self.tag_len = struct.Struct(order + "HHI")  # group, element, 4-byte length
        self.seen = Framing(buf)

    def _need(self, pos: int, size: int, what: str) -> None:
        if pos + size > self.end:
            raise FramingError(f"data set ends inside {what} at byte {pos} (needs {size} more)")

    def _item_header(self, pos: int) -> tuple[int, int]:
        self._need(pos, 8, "an item header")
        group, element, length = self.tag_len.unpack_from(self.buf, pos)
        return (group << 16) | element, length

    def elements(self, pos: int, stop_at_item_end: bool, top_level: bool = False) -> int:
        """Walk elements from `pos`; return the position after the last one."""
        seen = self.seen
        while pos < self.end:
            start = pos
            self._need(pos, 4, "an element tag")
            group, element = self.tag.unpack_from(self.buf, pos)
            tag = (group << 16) | element
            if tag == _ITEM_END:
                if not stop_at_item_end:
                    raise FramingError(f"unexpected item delimiter at byte {pos}")
                return pos + 8
            seen.elements += 1
            if seen.elements > self.limits.max_elements:
                raise LimitExceeded(f"data set has more than {self.limits.max_elements} elements")
            if self.implicit or group == 0xFFFE:
                self._need(pos, 8, "an element header")
                vr, length, pos = None, self.u32.unpack_from(self.buf, pos + 4)[0], pos + 8
            else:
                self._need(pos, 8, "an element header")
                vr = _VR_CODE.unpack_from(self.buf, pos + 4)[0]
                if vr not in _KNOWN_VR_CODES:
                    raise FramingError(f"unknown VR {bytes(self.buf[pos + 4:pos + 6])!r} in "
                                       f"({group:04X},{element:04X}) at byte {pos}")
                if vr in _LONG_VR_CODES:
                    self._need(pos, 12, "an element header")
                    length, pos = self.u32.unpack_from(self.buf, pos + 8)[0], pos + 12
                else:
                    length, pos = self.u16.unpack_from(self.buf, pos + 6)[0], pos + 8
            if top_level:
                if group > HEADER_GROUPS and seen.header_end is None:
                    seen.header_end = start
                if tag in BULK_DATA:
                    seen.bulk_data = True
            if length == _UNDEFINED:
                if tag == PIXEL_DATA and top_level:
                    seen.pixel_length = -1  # encapsulated
                    pos = self.fragments(pos)
                else:
                    pos = self.sequence(pos, vr == _UN)
            else:
                self._need(pos, length, f"the value of ({group:04X},{element:04X})")
                if tag == PIXEL_DATA and top_level:
                    seen.pixel_length = length
                pos += length
        if stop_at_item_end:
            raise FramingError("data set ends before an item delimiter")
        return pos

    def sequence(self, pos: int, unknown_vr: bool) -> int:
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise LimitExceeded(f"sequences nested deeper than {self.limits.max_depth} levels")
        # UN with undefined length is encoded as implicit VR (PS3.5 6.2.2).
        saved, self.implicit = self.implicit, self.implicit or unknown_vr
        try:
            while True:
                tag, length = self._item_header(pos)
                pos += 8
                if tag == _SEQ_END:
                    return pos
                if tag != _ITEM:
                    raise FramingError(f"expected an item at byte {pos - 8}")
                if length == _UNDEFINED:
                    pos = self.elements(pos, stop_at_item_end=True)
                else:
                    self._need(pos, length, "a sequence item")
                    pos += length
        finally:
            self.implicit = saved
            self.depth -= 1

    def fragments(self, pos: int) -> int:
        items = 0
        while True:
            tag, length = self._item_header(pos)
            pos += 8
            if tag == _SEQ_END:
                self.seen.pixel_fragments = max(items - 1, 0)  # the first item is the offset table
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise FramingError(f"malformed pixel data fragment at byte {pos - 8}")
            self._need(pos, length, "a pixel data fragment")
            pos += length
            items += 1


def inflate(dataset: bytes, max_bytes: int) -> bytearray:
    """A deflated data set's bytes, refused once they pass `max_bytes`. Inflated a megabyte at a
    time into one buffer: a deflate bomb costs at most about `max_bytes`, never the full
    expansion (one zlib call would also hold its output twice while joining it)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = dataset
    try:
        while True:
            chunk = inflater.decompress(pending, 1 << 20)
            out += chunk
            if len(out) > max_bytes:
                raise LimitExceeded(f"deflated data set inflates to more than {max_bytes} bytes")
            pending = inflater.unconsumed_tail
            if inflater.eof or not (pending or chunk):
                break
        out += inflater.flush()
    except zlib.error as error:
        raise FramingError(f"deflated data set does not inflate: {error}") from None
    if not inflater.eof:
        raise FramingError("deflated data set is truncated")
    return out


def check_framing(dataset: bytes, transfer_syntax: UID, limits: Limits = Limits()) -> Framing:
    """Raise FramingError if `dataset` (no file meta) is not whole, LimitExceeded past `limits`.

    Returns what the walk saw, with the data set as walked: inflated for the deflated
    transfer syntax, so the caller parses it without inflating it again.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        dataset = inflate(dataset, limits.max_bytes)
    elif len(dataset) > limits.max_bytes:
        raise LimitExceeded(f"data set is larger than {limits.max_bytes} bytes")
    walker = _Walker(dataset, implicit=transfer_syntax.is_implicit_VR, little=transfer_syntax.is_little_endian,
                     limits=limits)
    walker.elements(0, stop_at_item_end=False, top_level=True)
    return walker.seen
