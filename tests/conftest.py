# SPDX-License-Identifier: Apache-2.0
"""Shared test configuration: hypothesis profiles and the report header."""

from __future__ import annotations

import os
import platform

from hypothesis import HealthCheck, settings

# Function-scoped fixtures here only select an implementation, which must stay the
# same for every example of a test, so hypothesis' warning about them does not apply.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", max_examples=50, deadline=None, suppress_health_check=_QUIET
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=_QUIET
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config: object) -> list[str]:
    from mpc_runtime import masking
    from mpc_runtime.masking._cpu import cpu_flags, cpu_model

    return [
        f"secagg masking IMPLEMENTATION={masking.IMPLEMENTATION} "
        f"(SECAGG_KERNEL={os.environ.get('SECAGG_KERNEL', 'auto')})",
        f"cpu: {cpu_model()} ({platform.machine()}) flags: {' '.join(cpu_flags())}",
    ]
