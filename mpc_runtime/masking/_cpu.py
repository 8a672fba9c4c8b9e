# SPDX-License-Identifier: Apache-2.0
"""What the CPU offers the kernel, for reports (the kernel probes CPUID itself)."""

from __future__ import annotations

import platform
from pathlib import Path

#: The features that decide which kernel variant runs, in report order.
RELEVANT_FLAGS = ("aes", "sse4_1", "avx2", "avx512f", "vaes", "vpclmulqdq")


def cpu_model() -> str:
    """The CPU's model name, or the machine type where /proc/cpuinfo is missing."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> tuple[str, ...]:
    """Which of :data:`RELEVANT_FLAGS` the CPU reports (Linux /proc/cpuinfo)."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in RELEVANT_FLAGS if f in have)
    return ()


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
