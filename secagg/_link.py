# SPDX-License-Identifier: Apache-2.0
"""The researcher's one socket and the loop that drives it.

A :class:`ResearcherLink` owns a :class:`mpc_runtime.transport.ResearcherEndpoint`
(bound on first use) and the researcher's keys, and runs the send/receive/tick
loop (:meth:`ResearcherLink.pump`) that :class:`secagg.SecureAggregation` and
:class:`secagg.Experiment` both use. An Experiment and its ``exp.secagg`` share
one link, hence one socket (DESIGN §1).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final

from mpc_runtime.errors import ConfigError
from mpc_runtime.messages import Message
from mpc_runtime.protocol.node import Outgoing
from mpc_runtime.protocol.server import Server
from mpc_runtime.transport import ResearcherEndpoint, TransportOptions

from . import files
from .node import DRIVER_CONTEXT

__all__ = ["ResearcherLink"]

_POLL: Final = 0.02


class ResearcherLink:
    """The researcher's keys, its socket, and the loop over it.

    Parameters
    ----------
    home
        The researcher directory (keys, ``nodes/``).
    endpoint
        Where to bind; a port of ``0`` picks a free one.
    options, logger
        Transport options and the logger.

    Raises
    ------
    ConfigError
        Missing or invalid key files.
    """

    def __init__(
        self,
        home: Path,
        endpoint: str,
        *,
        options: TransportOptions | None = None,
        logger: logging.Logger,
    ) -> None:
        self.home = home
        self.requested_endpoint = endpoint
        self.keys = files.load_researcher_keys(home)
        self.log = logger
        self._options = options
        self._endpoint: ResearcherEndpoint | None = None
        self.closed = False
        # Driver requests (shape queries, cleartext rounds) are told apart by a
        # query number; one counter per socket, starting at random so a restarted
        # researcher does not match answers meant for its predecessor.
        self._query = secrets.randbelow(1 << 40) + 1

    def next_query(self) -> int:
        """A fresh query number for a driver request on this socket."""
        self._query += 1
        return self._query

    @property
    def researcher_id(self) -> str:
        """This researcher's id (from ``researcher.key``)."""
        return self.keys.id

    def open(self) -> ResearcherEndpoint:
        """The endpoint, bound on first call."""
        if self.closed:
            raise ConfigError("this researcher socket is closed")
        if self._endpoint is None:
            address = self.requested_endpoint
            head, sep, port = address.rpartition(":")
            if sep and port == "0":
                address = f"{head}:*"
            self._endpoint = ResearcherEndpoint(
                address,
                self.keys.curve_public,
                self.keys.curve_secret,
                enrolled=files.load_enrolled(self.home),
                options=self._options,
                logger=self.log.getChild("transport"),
            )
        return self._endpoint

    @property
    def endpoint(self) -> str:
        """The bound address (binds if needed)."""
        return self.open().endpoint

    def close(self) -> None:
        """Release the socket. Idempotent."""
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        self.closed = True

    def refresh_enrolled(self) -> dict[str, bytes]:
        """Re-read ``home/nodes/`` into the endpoint; return the enrolled keys."""
        ep = self.open()
        enrolled = files.load_enrolled(self.home)
        for node, key in enrolled.items():
            ep.enroll(node, key)
        return dict(enrolled)

    def wait_routable(self, nodes: Collection[str], limit: float) -> set[str]:
        """Wait up to ``limit`` seconds for ``nodes`` to say hello; return the
        ones still unroutable."""
        ep = self.open()
        self.pump(
            lambda: all(ep.is_routable(v) for v in nodes),
            server=None,
            outbox=[],
            limit=limit,
        )
        return {v for v in nodes if not ep.is_routable(v)}

    def pump(
        self,
        done: Callable[[], bool],
        *,
        server: Server | None,
        outbox: list[Outgoing],
        on_driver: Callable[[str, Message], None] | None = None,
        limit: float,
    ) -> None:
        """Send, receive and tick until ``done()`` or ``limit`` seconds pass.

        Protocol messages go to ``server``; driver messages (context id
        :data:`DRIVER_CONTEXT`) to ``on_driver``. A message to a node that is not
        routable yet (it has not said hello) stays in ``outbox`` and is retried;
        whatever is left at the end is dropped.
        """
        ep = self.open()
        end = time.monotonic() + limit
        while True:
            if outbox:
                left = []
                for item in outbox:
                    if not ep.is_routable(item.to) or not ep.send(
                        item.to, item.message
                    ):
                        left.append(item)
                outbox[:] = left
            if done() or time.monotonic() >= end:
                return
            got = ep.recv(_POLL)
            now = time.monotonic()
            if got is not None:
                sender, msg = got
                if msg.context_id == DRIVER_CONTEXT:
                    if on_driver is not None:
                        on_driver(sender, msg)
                elif server is not None:
                    outbox.extend(server.handle(msg, now))
            if server is not None:
                outbox.extend(server.tick(now))
