# SPDX-License-Identifier: Apache-2.0
"""Drivers of the secagg protocol inside other federated-learning frameworks.

Each integration is an optional extra: :mod:`secagg.integrations.flower` needs
``pip install secagg[flower]``.
"""
