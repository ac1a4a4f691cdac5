"""Presence on a Pulsar broker: is a peer's session connected right now?

Each session (Spark's driver and tasks alike) keeps a producer on its party's presence topic
``persistent://{tenant}/{job_id}/present-{role}-{party_id}`` and never publishes on it. A
topic's stats list its connected producers from the broker's live state
(computed on request; only the rates in them are sampled), and the broker drops a producer
the moment its connection closes, a SIGKILLed process's included (the kernel closes its
sockets). So a peer asks the admin REST API for the stats: a producer listed, the party is
connected; none, or no topic, it is not. Needs ``admin_url``; without it, and in ``direct``
and ``replication`` modes (a peer's producer is on its own broker), the answer is unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pulsar

from ...errors import FederationError
from ...party import Party
from .admin import PulsarAdmin
from .connection import PulsarClients, bounded
from .naming import PulsarNames, party_part

log = logging.getLogger("fedtransport.pulsar")

_ASK_TIMEOUT = 5.0  # seconds an admin call for a peer's presence may take; a timeout message waits for it


class Presence:
    """This session's presence producer and admin checks of peers' (see the module docstring)."""

    def __init__(self, clients: PulsarClients, names: PulsarNames, options: Mapping[str, Any], *, usable: bool) -> None:
        self._clients = clients
        self._names = names
        self._admin: PulsarAdmin | None = None
        if usable and options["admin_url"]:
            self._admin = PulsarAdmin(
                options["admin_url"],
                token=options["token"],
                tls_trust_certs_file_path=options["tls_trust_certs_file_path"],
                tls_validate_hostname=options["tls_validate_hostname"],
                timeout=_ASK_TIMEOUT,
            )
        self._producer: Any = None

    def topic(self, party: Party) -> str:
        return f"persistent://{self._names.tenant}/{self._names.namespace}/present-{party_part(party)}"

    def announce(self, party: Party, url: str) -> None:
        """Open this session's presence producer; closed with the client. A failure only costs the
        peers their view of us (logged)."""
        if self._admin is None:
            return
        topic = self.topic(party)
        try:
            client = self._clients.client(url)
            self._producer = bounded(
                lambda: client.create_producer(topic), _ASK_TIMEOUT * 2, "no presence producer", lambda p: p.close()
            )
        except (Exception, pulsar.PulsarException) as exc:
            log.warning("Pulsar: the presence producer on %s could not be made (peers cannot see us): %s", topic, exc)

    def present(self, party: Party) -> bool | None:
        if self._admin is None:
            return None
        try:
            stats = self._admin.get_topic_stats(self.topic(party))
        except FederationError as exc:
            log.debug("Pulsar: presence of %s unknown: %s", party, exc)
            return None
        return bool(stats and stats.get("publishers"))
