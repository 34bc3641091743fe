"""Fetch a public dataset file, checked against its expected SHA-256 before it lands.

Opt-in per task (`tasks.<name>.download: true`); nothing downloads unless asked. The
file is streamed into a temporary file next to its destination while hashed, and renamed
onto it only when the digest matches, so a wrong or truncated file never appears under
the destination's name.

Known-good sources (the defaults of `tasks.<name>.url` / `sha256`):

- PubMedQA `ori_pqal.json` at the pubmedqa/pubmedqa repository's commit 1cbae8e9; the
  SHA-256 is the one published for that commit by a public methodology note (we could not
  fetch the file from this machine to check it ourselves).

MedQA (Google Drive), MedNLI (PhysioNet credentials), HoC and BioASQ (registration) have no
stable public URL: fetch them by hand.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from mop.errors import MopError
from mop.io import atomic_path

SOURCES = {
    "pubmedqa": {
        "file": "ori_pqal.json",
        "url": (
            "https://raw.githubusercontent.com/pubmedqa/pubmedqa/"
            "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997/data/ori_pqal.json"
        ),
        "sha256": "8b3276be8942ebbd77f3ddcda12c1749bf0e490045a736fd8438ee40cf37a41d",
    },
}
CHUNK = 1 << 20


def source(task: str, options: dict) -> dict[str, str]:
    """The file, URL and checksum a task downloads (config values over the defaults)."""
    if task not in SOURCES:
        raise MopError(
            f"config key tasks.{task}.download: {task} has no stable public URL "
            f"(only {', '.join(SOURCES)} can be downloaded); put its files in "
            f"tasks.{task}.path by hand"
        )
    return {
        "file": SOURCES[task]["file"],
        "url": options.get("url") or SOURCES[task]["url"],
        "sha256": (options.get("sha256") or SOURCES[task]["sha256"]).lower(),
    }


def download(url: str, sha256: str, out: str | Path, timeout: float = 60) -> Path:
    """Stream `url` to `out` if its SHA-256 is `sha256`; otherwise write nothing."""
    out = Path(out)
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(out) as tmp:
            with tmp.open("wb") as f:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
            if digest.hexdigest() != sha256.lower():
                raise MopError(
                    f"{url}: SHA-256 {digest.hexdigest()} ({size} bytes), expected {sha256}; "
                    f"nothing written to {out}"
                )
    except (urllib.error.URLError, OSError) as exc:
        raise MopError(f"{url}: download failed ({exc}); nothing written to {out}") from exc
    return out
