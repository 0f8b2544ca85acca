"""Check that an encoded data set is structurally whole, without decoding values.

Written by hand because pydicom is deliberately lenient: a data set cut short
reads back with short values and at most a warning, and pynetdicom hands us the
bytes as they arrived. A receiver that must never acknowledge a half object
needs a strict check of the element framing (tag, VR, length) alone, which is
cheap: it touches each element header once and never copies a value.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010


class FramingError(ValueError):
    """The data set's element framing is broken (truncated or malformed)."""


class _Walker:
    def __init__(self, buf: bytes, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.end = len(buf)
        order = "<" if little else ">"
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "I")
        self.tag_len = struct.Struct(order + "HHI")  # group, element, 4-byte length
        self.pixel_length: int | None = None

    def _need(self, pos: int, size: int, what: str) -> None:
        if pos + size > self.end:
            raise FramingError(f"data set ends inside {what} at byte {pos} (needs {size} more)")

    def _item_header(self, pos: int) -> tuple[int, int]:
        self._need(pos, 8, "an item header")
        group, element, length = self.tag_len.unpack_from(self.buf, pos)
        return (group << 16) | element, length

    def elements(self, pos: int, stop_at_item_end: bool, top_level: bool = False) -> int:
        """Walk elements from `pos`; return the position after the last one."""
        while pos < self.end:
            self._need(pos, 4, "an element tag")
            group, element = self.u16.unpack_from(self.buf, pos)[0], self.u16.unpack_from(self.buf, pos + 2)[0]
            tag = (group << 16) | element
            if tag == _ITEM_END:
                if not stop_at_item_end:
                    raise FramingError(f"unexpected item delimiter at byte {pos}")
                return pos + 8
            if self.implicit or group == 0xFFFE:
                self._need(pos, 8, "an element header")
                vr, length, pos = None, self.u32.unpack_from(self.buf, pos + 4)[0], pos + 8
            else:
                self._need(pos, 8, "an element header")
                vr = self.buf[pos + 4 : pos + 6]
                if vr in _LONG_VRS:
                    self._need(pos, 12, "an element header")
                    length, pos = self.u32.unpack_from(self.buf, pos + 8)[0], pos + 12
                else:
                    length, pos = self.u16.unpack_from(self.buf, pos + 6)[0], pos + 8
            if length == _UNDEFINED:
                if tag == PIXEL_DATA and top_level:
                    self.pixel_length = -1  # encapsulated
                    pos = self.fragments(pos)
                else:
                    pos = self.sequence(pos, vr == b"UN")
            else:
                self._need(pos, length, f"the value of ({group:04X},{element:04X})")
                if tag == PIXEL_DATA and top_level:
                    self.pixel_length = length
                pos += length
        if stop_at_item_end:
            raise FramingError("data set ends before an item delimiter")
        return pos

    def sequence(self, pos: int, unknown_vr: bool) -> int:
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

    def fragments(self, pos: int) -> int:
        while True:
            tag, length = self._item_header(pos)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise FramingError(f"malformed pixel data fragment at byte {pos - 8}")
            self._need(pos, length, "a pixel data fragment")
            pos += length


def check_framing(dataset: bytes, transfer_syntax: UID) -> int | None:
    """Raise FramingError if `dataset` (no file meta) is not whole.

    Returns the length of the top-level Pixel Data value (-1 if encapsulated,
    None if absent) so the caller can compare it with Rows x Columns.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            dataset = inflater.decompress(dataset) + inflater.flush()
        except zlib.error as error:
            raise FramingError(f"deflated data set does not inflate: {error}") from None
        if not inflater.eof:
            raise FramingError("deflated data set is truncated")
    walker = _Walker(dataset, implicit=transfer_syntax.is_implicit_VR, little=transfer_syntax.is_little_endian)
    walker.elements(0, stop_at_item_end=False, top_level=True)
    return walker.pixel_length
