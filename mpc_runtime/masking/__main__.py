# SPDX-License-Identifier: Apache-2.0
"""``python -m mpc_runtime.masking``: the version, the kernel in use and the CPU."""

import platform

from mpc_runtime import __version__, masking
from mpc_runtime.masking._cpu import cpu_flags, cpu_model

try:
    from mpc_runtime.masking import _native

    runnable = ", ".join(_native.available()) or "none"
except ImportError as e:
    runnable = f"none (the compiled kernel is not importable: {e})"

print(f"secagg {__version__}")
print(f"IMPLEMENTATION = {masking.IMPLEMENTATION}")
print(f"compiled variants this CPU runs: {runnable}")
print(
    f"cpu: {cpu_model()} ({platform.machine()}); flags: {' '.join(cpu_flags()) or 'none relevant'}"
)
