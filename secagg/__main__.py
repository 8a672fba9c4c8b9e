# SPDX-License-Identifier: Apache-2.0
"""``python -m secagg``: the same command line as the ``secagg`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
