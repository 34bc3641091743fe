"""Line-exact checks of delimited release files (UMLS RRF, SNOMED CT RF2) before parsing.

Polars parses these files fast but cannot say which line is wrong: a short line silently
becomes nulls and invalid UTF-8 fails without a position. So every file is first checked
in blocks of whole lines with numpy, two at a time (seconds per GB, bounded memory): UTF-8,
the number of separators on every line and, for RRF, the trailing separator. The first
bad line is reported with its 1-based number.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from mop.errors import MopError

BLOCK_BYTES = 1 << 24
THREADS = 2  # numpy releases the GIL: two blocks are checked at once


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
    check = partial(
        _check_block,
        sep_byte=ord(sep),
        expected=fields if trailing else fields - 1,
        trailing=trailing,
        fields=fields,
    )
    lines_before = 0
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for body in _blocks(path, block_bytes):
            pending.append(pool.submit(check, body))
            if len(pending) > 2 * THREADS:
                lines_before = _collect(path, pending.popleft(), lines_before)
        while pending:
            lines_before = _collect(path, pending.popleft(), lines_before)
    return lines_before


def _blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """The file in blocks of whole lines (a last line without a newline gets one)."""
    carry = b""
    with path.open("rb") as fh:
        while block := fh.read(block_bytes):
            buf = carry + block if carry else block
            end = buf.rfind(b"\n")
            if end < 0:
                carry = buf
                continue
            yield buf[: end + 1]
            carry = buf[end + 1 :]
    if carry:
        yield carry + b"\n"


def _collect(path: Path, future: Future, lines_before: int) -> int:
    """Lines after this block, or the block's first problem as a MopError with its line."""
    lines, problem = future.result()
    if problem is not None:
        line, message = problem
        raise MopError(f"{path}:{lines_before + line}: {message}")
    return lines_before + lines


def _check_block(
    body: bytes, *, sep_byte: int, expected: int, trailing: bool, fields: int
) -> tuple[int, tuple[int, str] | None]:
    """Check whole lines in `body`; return (lines, None) or (lines, (1-based line, problem))."""
    arr = np.frombuffer(body, dtype=np.uint8)
    newlines = np.flatnonzero(arr == 10)
    if arr.max() >= 0x80:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = int(np.searchsorted(newlines, exc.start)) + 1
            column = exc.start - body.rfind(b"\n", 0, exc.start)
            byte = body[exc.start]
            return newlines.size, (line, f"not valid UTF-8 (byte 0x{byte:02x} at byte {column})")
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
        return newlines.size, None
    i = int(np.argmax(bad))
    found = int(counts[i])
    if trailing and not ends_ok[i]:
        if found == expected - 1:
            return newlines.size, (i + 1, f"the line does not end with {sep_name}")
        found += 1
    found_fields = found if trailing else found + 1
    return newlines.size, (i + 1, f"expected {fields} fields, found {found_fields}")
