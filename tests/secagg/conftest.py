# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the service tests: ``deploy`` and ``daemon_factory``."""

from ._service_support import daemon_factory, deploy

__all__ = ["daemon_factory", "deploy"]
