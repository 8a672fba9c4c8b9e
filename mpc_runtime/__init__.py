# SPDX-License-Identifier: Apache-2.0
"""Hazmat layer of secagg: masking, keys, secret sharing, messages and protocol machines.

Everything here takes explicit parameters and is meant for experts; most users want
the recipes in :mod:`secagg`.
"""

__version__ = "0.1.0"
