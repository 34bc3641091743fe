"""Line-exact checks of delimited release files (UMLS RRF, SNOMED CT RF2) before parsing.

Polars parses these files fast but cannot say which line is wrong: a short line silently
becomes nulls and invalid UTF-8 fails without a position. So every file is first checked
in fixed-size byte blocks with numpy (a few seconds per GB, bounded memory): UTF-8,
the number of separators on every line and, for RRF, the trailing separator. The first
bad line is reported with its 1-based number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mop.errors import MopError

BLOCK_BYTES = 1 << 24


def check_delimited(
    path: str | Path,
    *,
    fields: int,
    sep: str = "|",
    trailing: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> int:
    """Check that every line of `path` has `fields` fields; return the number of lines.

    trailing: every field, the last one included, is followed by `sep` (RRF), so a line
    holds `fields` separators and ends with one; otherwise a line holds `fields - 1`.
    A missing final newline is accepted. Raises MopError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise MopError(f"{path}: file not found")
    sep_byte = ord(sep)
    expected = fields if trailing else fields - 1
    lines_before = 0
    carry = b""
    with path.open("rb") as fh:
        while True:
            block = fh.read(block_bytes)
            if not block:
                break
            buf = carry + block if carry else block
            end = buf.rfind(b"\n")
            if end < 0:
                carry = buf
                continue
            body, carry = buf[: end + 1], buf[end + 1 :]
            _check_block(path, body, lines_before, sep_byte, expected, trailing, fields)
            lines_before += body.count(b"\n")
    if carry:
        _check_block(path, carry + b"\n", lines_before, sep_byte, expected, trailing, fields)
        lines_before += 1
    return lines_before


def _check_block(
    path: Path,
    body: bytes,
    lines_before: int,
    sep_byte: int,
    expected: int,
    trailing: bool,
    fields: int,
) -> None:
    """Check whole lines in `body` (which ends with a newline)."""
    arr = np.frombuffer(body, dtype=np.uint8)
    if arr.max() >= 0x80:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = lines_before + body.count(b"\n", 0, exc.start) + 1
            column = exc.start - body.rfind(b"\n", 0, exc.start)
            raise MopError(
                f"{path}:{line}: not valid UTF-8 (byte 0x{body[exc.start]:02x} at byte {column})"
            ) from None
    newlines = np.flatnonzero(arr == 10)
    seps = np.flatnonzero(arr == sep_byte)
    counts = np.diff(np.searchsorted(seps, newlines), prepend=0)
    bad = counts != expected
    sep_name = repr(chr(sep_byte))
    if trailing:
        before = newlines - 1
        ends_ok = np.zeros(newlines.size, dtype=bool)
        has_char = before >= np.concatenate([[0], newlines[:-1] + 1])
        ends_ok[has_char] = arr[before[has_char]] == sep_byte
        bad |= ~ends_ok
    if not bad.any():
        return
    i = int(np.argmax(bad))
    line = lines_before + i + 1
    found = int(counts[i])
    if trailing and not ends_ok[i]:
        if found == expected - 1:
            raise MopError(f"{path}:{line}: the line does not end with {sep_name}")
        found += 1
    found_fields = found if trailing else found + 1
    raise MopError(f"{path}:{line}: expected {fields} fields, found {found_fields}")
