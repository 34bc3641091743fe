"""What CPU this is, from Linux's /proc/cpuinfo (torch-free, so that reports can ask too):
its feature flags, which decide CPU bf16 (mop.runtime), and its model name, which every
figure's provenance line states (benchmarks, `mop report docs`)."""

from __future__ import annotations

import platform


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo; None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty off Linux)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name, or what Python's platform module knows of it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()
