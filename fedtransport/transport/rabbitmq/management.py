"""The control plane of the RabbitMQ backend: everything it asks the management HTTP API.

``RabbitManagement`` creates a job's vhost, its expiry policy, the party's data user and
its permissions (``setup_vhost``, at open); in federated mode the link users the other
brokers pull with (``ensure_link_user``) and the upstreams and policies that pull the other
parties' queues here (``ensure_upstream``); it tells why a federation link is down
(``warn_about_links``), lists what a job left on the broker (``inventory``) and deletes it
(``cleanup``). The data plane (``connection``, ``publisher``, ``consumer``) never imports it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from ...errors import BackendError, RouteError
from ...identity import PairKeys
from ...party import Party
from ...routing import RouteTable, is_ip, url_host
from .admin import RabbitAdmin
from .naming import RabbitNames

__all__ = ["EXPIRY_POLICY", "RabbitManagement", "derive_password"]

log = logging.getLogger("fedtransport.rabbitmq")

EXPIRY_POLICY = "fedtransport-expiry"
_UPSTREAM_RECONNECT = 1  # seconds between a federation link's reconnect attempts


def derive_password(key: bytes, label: str, name: str) -> str:
    """A password only holders of ``key`` can compute: HMAC-SHA256 over a label and a name."""
    digest = hmac.new(key, f"fedtransport/rabbitmq/{label}\0{name}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


class RabbitManagement:
    """One party's control plane for one job, on its own broker (admin credentials).

    ``options`` are the backend's checked options; ``fed_ssl`` the TLS settings of
    federation upstreams (``None``: plain ``amqp://``); ``data_user``/``data_password`` the
    party's data-plane user, which ``setup_vhost`` creates.
    """

    def __init__(
        self,
        names: RabbitNames,
        options: Mapping[str, Any],
        *,
        route_table: RouteTable | None,
        fed_ssl: Mapping[str, str] | None,
        peer_credentials: Mapping[str, tuple[str, str]],
        secret: bytes | None,
        pair_keys: PairKeys | None = None,
        data_user: str,
        data_password: str,
    ) -> None:
        self.names = names
        self.vhost = names.vhost
        self.federated = options["mode"] == "federated"
        self._options = options
        self._route_table = route_table
        self._fed_ssl = fed_ssl
        self._peer_credentials = peer_credentials
        self._secret = secret
        self._pairs = pair_keys
        self._data_user = data_user
        self._data_password = data_password
        self._ttl_ms = int(options["ttl_seconds"]) * 1000
        self._admin: RabbitAdmin | None = None
        self._admin_lock = threading.Lock()  # guards the lazily made management client
        self._setup_lock = threading.Lock()  # set-up per remote party, once
        self._upstreams: set[Party] = set()
        self._links: set[Party] = set()
        self._warned_admin_upstream = False

    def admin(self) -> RabbitAdmin:
        """The management API client of this party's broker (admin credentials)."""
        with self._admin_lock:
            if self._admin is None:
                o = self._options
                base = f"http://{url_host(str(o['host']))}:{o['mng_port']}"
                self._admin = RabbitAdmin(base, o["user"], o["password"])
            return self._admin

    # the job's vhost and users -------------------------------------------------------------

    def setup_vhost(self) -> tuple[bool, bool]:
        """Create the job's vhost and this party's data user if missing.

        Returns ``(vhost created, user created)`` for :meth:`undo_setup`. A failure part-way
        removes what this call created before it raises."""
        a = self.admin()
        if self.federated:
            a.require_plugins("rabbitmq_federation")
        created = (a.get_vhost(self.vhost) is None, a.get_user(self._data_user) is None)
        try:
            a.put_vhost(self.vhost, description=f"fedtransport job {self.names.job_id}")
            # The safety net for a scheduler that never calls cleanup: unused queues expire.
            a.put_policy(self.vhost, EXPIRY_POLICY, ".*", {"expires": self._ttl_ms}, priority=0)
            self._put_user(self._data_user, self._data_password)
            a.set_permissions(self.vhost, self._data_user, *self.names.data_permissions())
        except BaseException:
            self.undo_setup(created)
            raise
        return created

    def undo_setup(self, created: tuple[bool, bool]) -> None:
        """Remove what :meth:`setup_vhost` created, after the open that made it failed.

        Never what a peer made: the vhost goes only while no other user has permissions on it
        (another party's session of a shared broker, or one of this party's). Best effort: the
        open's own error is what the caller sees."""
        vhost_created, user_created = created
        a = self.admin()
        try:
            if user_created:
                a.delete_user(self._data_user)
            if vhost_created:
                ours = {self._data_user, str(self._options["user"])}  # the admin may be granted it on creation
                others = [p for p in self._listing(a.list_permissions) if p.get("user") not in ours]
                if not others:
                    a.delete_vhost(self.vhost)
        except BackendError as exc:
            log.warning("could not remove what a failed connect created in %s: %s", self.vhost, exc)

    def _put_user(self, name: str, password: str) -> None:
        try:
            self.admin().put_user(name, password, tags="")
        except BackendError as exc:
            # Two processes of one party creating the same user at once: the loser gets a 400;
            # the user exists now, and a second PUT updates it.
            if exc.status != 400 or "already_exists" not in str(exc):
                raise
            self.admin().put_user(name, password, tags="")

    # federation ----------------------------------------------------------------------------

    def link_password(self, src: Party, dst: Party) -> str | None:
        """The password of the link user of ``src`` -> ``dst``; None without secret or pair keys.

        From the pair key of the two parties when there are pair keys (a third party of the
        job cannot compute it), else from the job secret (every party of the job can).
        """
        name = self.names.link_user(src, dst)
        if self._pairs is not None:
            return derive_password(self._pairs.pair_key(src, dst), "federation-link", f"{self.vhost}\0{name}")
        if self._secret is not None:
            return derive_password(self._secret, "federation-link", f"{self.vhost}\0{name}")
        return None

    def link_ready(self, dst: Party) -> bool:
        """Whether sending to ``dst`` needs no management call first (``ensure_link_user`` is done)."""
        return not self.federated or (self._secret is None and self._pairs is None) or dst in self._links

    def ensure_link_user(self, dst: Party) -> None:
        """Federated mode with a secret or pair keys: the user ``dst``'s broker pulls our queues as."""
        if not self.federated or (self._secret is None and self._pairs is None):
            return
        with self._setup_lock:  # the lanes' sends start together: one of them creates it
            if dst in self._links:
                return
            name = self.names.link_user(self.names.me, dst)
            pattern = self.names.queue_pattern(self.names.me, dst)
            password = self.link_password(self.names.me, dst)
            assert password is not None
            self._put_user(name, password)
            # The link declares the upstream queue (configure) and consumes it (read); nothing else.
            self.admin().set_permissions(self.vhost, name, pattern, "^$", pattern)
            self._links.add(dst)

    def _upstream_credentials(self, src: Party) -> tuple[str, str]:
        password = self.link_password(src, self.names.me)
        if password is not None:
            return self.names.link_user(src, self.names.me), password
        if src.party_id in self._peer_credentials:
            return self._peer_credentials[src.party_id]
        if not self._warned_admin_upstream:
            self._warned_admin_upstream = True
            log.warning(
                "job %s: no 'secret': federation upstreams authenticate with admin credentials "
                "(peer_credentials, else this party's own); set a job secret for least-privilege link users",
                self.names.job_id,
            )
        return str(self._options["user"]), str(self._options["password"])

    def upstream_uri(self, src: Party) -> str:
        """The AMQP URI our broker pulls ``src``'s queues from (credentials included)."""
        rt = self._route_table
        assert rt is not None
        ep = rt.resolve(src)
        tls = self._fed_ssl
        if ep.proxy:
            if tls is None:
                raise RouteError(
                    f"route table {rt.source}: party {src.party_id} is behind the proxy {ep.proxy}, "
                    "which routes by TLS server name: set the 'ssl' (or 'federation_ssl') option"
                )
            host, port = ep.proxy_host or "", ep.proxy_port or 0
        elif tls is not None:
            if ep.ssl_port is None:
                raise RouteError(f"route table {rt.source}: party {src.party_id} has no ssl_port for TLS federation")
            host, port = ep.host, ep.ssl_port
        else:
            host, port = ep.host, ep.port
        user, password = self._upstream_credentials(src)
        query: dict[str, str] = {}
        if tls is not None:
            query["cacertfile"] = tls["ca_file"]
            if "cert_file" in tls:
                query["certfile"] = tls["cert_file"]
                query["keyfile"] = tls.get("key_file", tls["cert_file"])
            query["verify"] = "verify_peer"
            if not is_ip(ep.sni):
                query["server_name_indication"] = ep.sni
        uri = (
            f"{'amqps' if tls is not None else 'amqp'}://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{url_host(host)}:{port}/{quote(self.vhost, safe='')}"
        )
        return f"{uri}?{urlencode(query)}" if query else uri

    def ensure_upstream(self, src: Party) -> None:
        """Federated mode: one upstream and one policy per remote party, pulling its queues to us."""
        if not self.federated:
            return
        with self._setup_lock:
            if src in self._upstreams:
                return
            a = self.admin()
            name = self.names.upstream_name(src)
            a.put_federation_upstream(
                self.vhost,
                name,
                self.upstream_uri(src),
                ack_mode="on-confirm",
                prefetch_count=int(self._options["federation_prefetch"]),
                reconnect_delay=_UPSTREAM_RECONNECT,
            )
            definition = {"federation-upstream": name, "expires": self._ttl_ms}  # one policy per queue wins
            pattern = self.names.queue_pattern(src, self.names.me)
            a.put_policy(self.vhost, self.names.policy_name(src), pattern, definition, apply_to="queues", priority=1)
            self._upstreams.add(src)

    def warn_about_links(self, src: Party) -> None:
        """No progress from ``src`` for a while: say why if its federation link is down."""
        try:
            links = self.admin().federation_links(self.vhost)
        except BackendError as exc:
            log.warning("cannot read the federation links of %s: %s", self.vhost, exc)
            return
        name = self.names.upstream_name(src)
        mine = [link for link in links if link.get("upstream") == name]
        bad = [link for link in mine if link.get("status") != "running"]
        if not mine or bad:
            detail = "; ".join(f"{x.get('queue')}: {x.get('status')} {x.get('error', '')}".strip() for x in bad)
            log.warning("federation from %s into %s is not running: %s", src, self.vhost, detail or "no link yet")

    # inventory and cleanup -----------------------------------------------------------------

    def _job_users(self, a: RabbitAdmin) -> list[str]:
        """Every user of the job: a crash between creating one and granting it permissions
        leaves one that no listing of the vhost shows."""
        return [str(u["name"]) for u in a.list_users() if str(u.get("name", "")).startswith(f"{self.vhost}:")]

    def inventory(self) -> list[str]:
        """Names of the job's resources on this party's broker (``fedtransport cleanup``)."""
        a = self.admin()
        found: list[str] = []
        if a.get_vhost(self.vhost) is not None:
            found.append(f"vhost {self.vhost}")
            found += [f"queue {q['name']}" for q in a.list_queues(self.vhost)]
            found += [f"policy {p['name']}" for p in a.list_policies(self.vhost)]
            found += [f"federation upstream {u['name']}" for u in a.list_federation_upstreams(self.vhost)]
        found += [f"user {name}" for name in self._job_users(a)]
        return found

    def cleanup(self) -> None:
        """Delete the job's policies, upstreams, vhost and users on this broker; idempotent.

        The data plane must be closed first: the vhost goes away with its channels."""
        a = self.admin()
        users = {self._data_user} | {self.names.link_user(self.names.me, dst) for dst in self._links}
        users |= {p["user"] for p in self._listing(a.list_permissions) if p["user"].startswith(f"{self.vhost}:")}
        users |= set(self._job_users(a))
        for policy in self._listing(a.list_policies):
            a.delete_policy(self.vhost, policy["name"])
        for upstream in self._listing(a.list_federation_upstreams):
            a.delete_federation_upstream(self.vhost, upstream["name"])
        a.delete_vhost(self.vhost)
        for user in sorted(users):
            a.delete_user(user)

    def _listing(self, call: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        try:
            return call(self.vhost) or []
        except BackendError as exc:
            if exc.status == 404:  # the vhost is gone already
                return []
            raise
