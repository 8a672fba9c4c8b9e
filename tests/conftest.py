# SPDX-License-Identifier: Apache-2.0
"""Shared test configuration: hypothesis profiles and the report header."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from hypothesis import HealthCheck, settings

# Function-scoped fixtures here only select an implementation, which must stay the
# same for every example of a test, so hypothesis' warning about them does not apply.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=50, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cpu_flags() -> str:
    wanted = ("aes", "avx2", "avx512f", "vaes", "vpclmulqdq", "sha_ni")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return " ".join(f for f in wanted if f in have) or "none of " + ",".join(wanted)
    return "unknown"


def pytest_report_header(config: object) -> list[str]:
    from mpc_runtime import masking

    return [
        f"secagg masking IMPLEMENTATION={masking.IMPLEMENTATION} "
        f"(SECAGG_KERNEL={os.environ.get('SECAGG_KERNEL', 'auto')})",
        f"cpu: {platform.machine()} flags: {_cpu_flags()}",
    ]
