"""One line per event on stderr, with the time: what a job log shows between progress bars."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"[mop {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
