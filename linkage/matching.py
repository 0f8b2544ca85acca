"""C-FIND attribute matching (PS3.4 C.2.2.2), compiled once per query key.

Universal (empty or "*"), single value, wildcard (* any sequence, ? exactly one character; no
other character is special; PatientName case-insensitively, as PS3.4 allows for PN), UID lists,
DA/TM ranges ("A-B", "-B", "A-"), and multi-valued keys (ModalitiesInStudy: any requested value
matches any stored one).
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.multival import MultiValue

Matcher = Callable[[object], bool]


def value_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def is_universal(value) -> bool:
    values = value_list(value)
    return not values or all(v.strip() in ("", "*") for v in values)


def has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def _fold(text: str) -> str:
    """Case-folded character by character, so that ? still stands for one stored character."""
    folded = text.casefold()
    if len(folded) == len(text):
        return folded
    return "".join(f if len(f := c.casefold()) == 1 else low if len(low := c.lower()) == 1 else c for c in text)


# By hand, not re: Python's re backtracks exponentially on e.g. *?*?*?*# and has no timeout.
class Wildcard:
    """One wildcard pattern, compiled: literal head, tail and pieces reject most values at C speed;
    what is left runs a bit-parallel automaton (Shift-And): one step per character of the value, on
    integers of len(pattern) bits, whatever the pattern. (The classic two-pointer matcher is O(n*m)
    too, but its Python steps took 2 s per 10^4 stored 64-character values on a bad pattern.)

    State i (bit i) means "the first i non-* pattern characters are matched"; a * before pattern
    character i lets state i consume any character. No backtracking, hence no blow-up."""

    def __init__(self, pattern: str, ignore_case: bool = False) -> None:
        self.fold = _fold if ignore_case else None
        pattern = self.fold(pattern) if ignore_case else pattern
        # Necessary conditions, checked first: the literal text before the first and after the
        # last wildcard, the two longest literal pieces, the length.
        pieces = pattern.replace("?", "*").split("*")
        self.head, self.tail = pieces[0], pieces[-1]
        self.pieces = sorted({p for p in pieces[1:-1] if p}, key=len, reverse=True)[:2]
        tokens = pattern.replace("*", "")
        self.min_len = len(tokens)
        self.exact_len = "*" not in pattern
        self.table: dict[str, int] = {}
        self.any = self.loops = 0
        for i, c in enumerate(tokens):
            if c == "?":
                self.any |= 1 << i
        for i, c in enumerate(tokens):
            if c != "?":
                self.table[c] = self.table.get(c, self.any) | 1 << i
        position = 0
        for c in pattern:
            if c == "*":
                self.loops |= 1 << position
            else:
                position += 1
        self.accept = 1 << len(tokens)
        self.open_end = bool(self.loops & self.accept)     # pattern ends with *: accepting is final

    def __call__(self, value: str) -> bool:
        if self.fold:
            value = self.fold(value)
        if len(value) < self.min_len or (self.exact_len and len(value) != self.min_len):
            return False
        if not value.startswith(self.head) or not value.endswith(self.tail):
            return False
        if any(piece not in value for piece in self.pieces):
            return False
        state, table, any_, loops, accept = 1, self.table, self.any, self.loops, self.accept
        for c in value:
            state = ((state & table.get(c, any_)) << 1) | (state & loops)
            if not state:
                return False
            if self.open_end and state & accept:
                return True
        return bool(state & accept)


def wildcard(pattern: str, ignore_case: bool = False) -> Matcher:
    """Matcher of one text value against one pattern (stripped; for PN empty trailing components
    dropped), with or without wildcards."""
    pattern = pattern.strip()
    if ignore_case:
        pattern = pattern.rstrip("^")   # "DOE^JOHN^^^" and "DOE^JOHN" are the same name
    if has_wildcard(pattern):
        compiled = Wildcard(pattern, ignore_case)
    elif ignore_case:
        target = pattern.casefold()
        compiled = lambda v: v.casefold() == target    # noqa: E731
    else:
        compiled = pattern.__eq__

    def match(value) -> bool:
        if value is None or value == "":
            return False
        value = str(value).strip()
        return compiled(value.rstrip("^") if ignore_case else value)

    return match


def date_range(value) -> tuple[str | None, str | None] | None:
    """'A-B', '-B', 'A-' or 'A' -> (low, high); None when universal."""
    if is_universal(value):
        return None
    text = value_list(value)[0].strip().replace(".", "")
    if "-" in text:
        low, high = (part.strip() or None for part in text.split("-", 1))
        return low, high
    return text, text


def _range(bounds, width: int) -> Matcher:
    low, high = bounds
    # Times: a partial bound such as 10 means 10:00:00 up to 10:59:59 at the top end.
    low = low.replace(":", "")[:width].ljust(width, "0") if low else None
    high = high.replace(":", "")[:width].ljust(width, "9") if high else None

    def match(value) -> bool:
        if not value:
            return False
        digits = value.replace(":", "").replace(".", "")[:width].ljust(width, "0")
        return (low is None or digits >= low) and (high is None or digits <= high)

    return match


def _any_of(query) -> Matcher:
    """Multi-valued stored attribute: any requested value matches any stored one. Results are
    remembered per stored value (few distinct modalities), so many requested values cost little."""
    exact = {v.strip() for v in value_list(query) if not has_wildcard(v)}
    patterns = [wildcard(v) for v in value_list(query) if has_wildcard(v)]
    seen: dict[str, bool] = {}

    def one(value: str) -> bool:
        if value not in seen:
            seen[value] = bool(value.strip()) and (value.strip() in exact or any(p(value) for p in patterns))
        return seen[value]

    return lambda stored: any(one(v) for v in value_list(stored))


def key_matcher(kind: str, query) -> Matcher | None:
    """The test one query key applies to a stored value; None when it matches everything."""
    if kind in ("count", "seq") or is_universal(query):
        return None
    if kind == "uid":
        uids = {v.strip() for v in value_list(query)}
        return lambda value: value in uids
    if kind in ("date", "time"):
        return _range(date_range(query), 8 if kind == "date" else 6)
    if kind == "multi":
        return _any_of(query)
    return wildcard(value_list(query)[0], kind == "pn")


def matches(kind: str, query, value) -> bool:
    """Does a stored value match one query key (PS3.4 C.2.2.2)?"""
    match = key_matcher(kind, query)
    return match is None or match(value)
