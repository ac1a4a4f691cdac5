"""A small Pulsar admin REST v2 client, the one the backend's control plane (``management``) drives.

What it does
------------
- Clusters: ``get_clusters()``, ``get_cluster()``, ``ensure_cluster()`` (PUT
  ``/admin/v2/clusters/{cluster}``; when the cluster exists (409) its data is replaced with POST),
  ``delete_cluster()``.
- Tenants: ``get_tenant()``, ``ensure_tenant()`` (PUT ``/admin/v2/tenants/{tenant}`` with
  ``{"adminRoles", "allowedClusters"}``; an existing tenant gets missing clusters added with POST,
  read back and written again while a concurrent writer erased them),
  ``delete_tenant()``.
- Namespaces: ``create_namespace()`` (PUT, 409 = already there = fine), ``namespace_exists()``,
  ``get_namespace_policies()``,
  ``get_replication_clusters()`` / ``set_replication_clusters()`` (GET / POST ``.../replication``,
  a JSON list), ``set_auto_topic_creation()`` (POST ``.../autoTopicCreation``), ``set_retention()``
  (POST ``.../retention``), ``set_message_ttl()`` (POST ``.../messageTTL``, an int of seconds),
  ``set_publish_rate()`` (POST ``.../publishRate``), ``list_topics()`` (GET ``.../topics``),
  ``list_partitioned_topics()`` (GET ``/admin/v2/persistent/{tenant}/{ns}/partitioned``),
  ``delete_namespace()`` (DELETE ``?force=true``; 404 = already gone; when the broker refuses
  forced deletion (405, Pulsar's default) partitioned topics, then topics, are deleted and the
  namespace with a plain DELETE, again while that is refused (409) because a client still
  connected re-created a topic, at most 5 times).
- Topics: ``delete_topic()`` (DELETE ``/admin/v2/persistent/{tenant}/{ns}/{topic}?force=true``,
  404 = already gone), ``delete_partitioned_topic()`` (DELETE ``.../{topic}/partitions?force=true``),
  ``get_topic_stats()`` (GET ``.../{topic}/stats``: producers, subscriptions, and per remote
  cluster its replicator).
- ``request()`` for any other endpoint.

Connection options and defaults
-------------------------------
- ``base_url``: the broker's web service URL, e.g. ``http://127.0.0.1:8080`` (a path prefix is
  kept, for admin endpoints behind a reverse proxy).
- ``token``: ``None``; a JWT sent as ``Authorization: Bearer <token>``. ``"token:<jwt>"`` and
  ``"file:///path"`` (Pulsar's own conventions) are accepted too.
- ``tls_trust_certs_file_path``: ``None`` -> the system trust store for ``https://`` URLs.
- ``tls_validate_hostname``: ``True``; ``False`` still verifies the certificate chain.
- ``timeout``: ``30.0`` seconds per HTTP request.
- Redirects (307/308, sent by a broker that does not own a namespace bundle) are followed with
  the same method, body and credentials, at most 5 hops.

Errors: any other non-success answer raises :class:`~fedtransport.errors.BackendError` naming the
method, path and status, with ``status`` set and ``broker_message`` = Pulsar's ``{"reason": ...}``
(or the title of Jetty's error page); a 401 from Pulsar's authentication filter says
"authentication failed" (no token, or one the broker rejected), a 401/403 from a handler "not
authorized"; a 500 ``BadVersionException`` (a concurrent writer of the same metadata won) is
treated as the 409 it stands for; an unreachable server raises ``BackendError`` naming the URL.
Standard library only (urllib).
"""

from __future__ import annotations

import json
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import BackendError, ConfigError

__all__ = ["PulsarAdmin"]

_MAX_REDIRECTS = 5
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_TOPIC_RE = re.compile(r"^(persistent|non-persistent)://([^/]+)/([^/]+)/(.+)$")
_NO_BODY: Any = object()
_HTML_TITLE_RE = re.compile(r"<title>\s*(?:Error\s+\d+\s+)?([^<]*?)\s*</title>", re.IGNORECASE)
_DELETE_ATTEMPTS = 5
_CONFLICT_ATTEMPTS = 8


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib refuses to re-send PUT/POST/DELETE on a 307; we follow redirects ourselves.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _segment(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value or "/" in value:
        raise ConfigError(f"invalid Pulsar {kind} name {value!r}: a non-empty name without '/'")
    return urllib.parse.quote(value, safe="")


def read_token(token: str | None) -> str | None:
    if token is None:
        return None
    if token.startswith("token:"):
        return token[len("token:") :]
    if token.startswith("file://"):
        path = Path(urllib.parse.urlparse(token).path)
        try:
            return path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the Pulsar admin token file {path}: {e}") from e
    return token


class PulsarAdmin:
    """Pulsar admin REST v2 client; see the module docstring for the calls it makes."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        tls_trust_certs_file_path: str | None = None,
        tls_validate_hostname: bool = True,
        timeout: float = 30.0,
    ) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"Pulsar admin_url must be http(s)://host:port, got {base_url!r}")
        if timeout <= 0:
            raise ConfigError(f"Pulsar admin timeout must be positive, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = read_token(token)
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if parsed.scheme == "https":
            try:
                context = ssl.create_default_context(cafile=tls_trust_certs_file_path)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"cannot load tls_trust_certs_file_path {tls_trust_certs_file_path!r}: {e}") from e
            context.check_hostname = tls_validate_hostname
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"PulsarAdmin({self.base_url!r}, token={'set' if self._token else 'none'})"

    # ------------------------------------------------------------------ HTTP
    def request(
        self,
        method: str,
        path: str,
        body: Any = _NO_BODY,
        *,
        query: Mapping[str, str] | None = None,
        tolerate: Iterable[int] = (),
        raw: bool = False,
    ) -> tuple[int, Any]:
        """Send one admin call; return ``(status, decoded JSON or text or None)``.

        ``path`` starts with ``/admin/v2``. Statuses in ``tolerate`` are returned instead of
        raising, so callers can treat "already exists" or "already gone" as success.
        """
        tolerated = set(tolerate)
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is _NO_BODY else json.dumps(body).encode()
        for _ in range(_MAX_REDIRECTS + 1):
            req = urllib.request.Request(url, data=data, method=method)
            req.add_header("Accept", "application/json")
            if data is not None or method in ("PUT", "POST"):
                req.add_header("Content-Type", "application/json")
            if self._token:
                req.add_header("Authorization", f"Bearer {self._token}")
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    body = resp.read()
                    return resp.status, body if raw else _decode(body, resp.headers.get("Content-Type", ""))
            except urllib.error.HTTPError as e:
                location = e.headers.get("Location") if e.headers else None
                if e.code in _REDIRECT_CODES and location:
                    url = urllib.parse.urljoin(url, location)
                    e.close()
                    continue
                payload = _decode(e.read(), e.headers.get("Content-Type", "") if e.headers else "")
                e.close()
                reason = _reason(payload) or (e.reason if isinstance(e.reason, str) else "")
                code = e.code
                if code == 500 and "BadVersion" in reason:
                    # Another writer changed the same metadata first (two parties creating
                    # one tenant on a fresh broker): the same outcome as a 409.
                    code = 409
                if code in tolerated:
                    return code, payload
                refusal = _refusal(code, payload, bool(self._token))
                raise BackendError(
                    f"Pulsar admin {method} {path} failed: {refusal}HTTP {e.code}" + (f": {reason}" if reason else ""),
                    broker_message=reason,
                    status=code,
                ) from None
            except urllib.error.URLError as e:
                raise BackendError(
                    f"Pulsar admin at {self.base_url} is unreachable ({method} {path}): {e.reason}"
                ) from e
            except (TimeoutError, ConnectionError) as e:
                raise BackendError(
                    f"Pulsar admin at {self.base_url} did not answer {method} {path} within {self.timeout:g} s: {e}"
                ) from e
        raise BackendError(f"Pulsar admin {method} {path}: more than {_MAX_REDIRECTS} redirects")

    # ------------------------------------------------------------------ clusters
    def get_clusters(self) -> list[str]:
        _, payload = self.request("GET", "/admin/v2/clusters")
        return sorted(payload or [])

    def get_cluster(self, name: str) -> dict[str, Any] | None:
        status, payload = self.request("GET", f"/admin/v2/clusters/{_segment('cluster', name)}", tolerate=(404,))
        return None if status == 404 else dict(payload or {})

    def ensure_cluster(self, name: str, data: Mapping[str, Any]) -> bool:
        """Register cluster ``name`` with ``data`` (ClusterData keys such as ``serviceUrl``,
        ``brokerServiceUrl``, ``proxyServiceUrl``, ``proxyProtocol``, ``peerClusterNames``).

        Returns True when it was created, False when an existing entry was updated.
        """
        path = f"/admin/v2/clusters/{_segment('cluster', name)}"
        body = {k: v for k, v in data.items() if v is not None}
        status, _ = self.request("PUT", path, body, tolerate=(409,))
        if status != 409:
            return True
        self.request("POST", path, body)
        return False

    def delete_cluster(self, name: str) -> bool:
        """Delete a cluster entry; False when it did not exist."""
        status, _ = self.request("DELETE", f"/admin/v2/clusters/{_segment('cluster', name)}", tolerate=(404,))
        return status != 404

    # ------------------------------------------------------------------ tenants
    def get_tenant(self, tenant: str) -> dict[str, Any] | None:
        status, payload = self.request("GET", f"/admin/v2/tenants/{_segment('tenant', tenant)}", tolerate=(404,))
        return None if status == 404 else dict(payload or {})

    def ensure_tenant(self, tenant: str, allowed_clusters: Sequence[str], admin_roles: Sequence[str] = ()) -> bool:
        """Create ``tenant`` allowed on ``allowed_clusters``; True when created.

        An existing tenant keeps its settings and gets any missing cluster added, so parties
        joining later can use it.
        """
        path = f"/admin/v2/tenants/{_segment('tenant', tenant)}"
        body = {"adminRoles": list(admin_roles), "allowedClusters": list(allowed_clusters)}
        status, _ = self.request("PUT", path, body, tolerate=(409,))
        if status != 409:
            return True
        # Read-modify-write, and Pulsar overwrites a tenant without a version check: a party
        # adding its cluster at the same moment as another (two jobs on one cluster, each adding
        # its peer) can erase the other's. So every write is read back, after a random pause
        # that lets a competing writer finish, and made again while something is missing.
        for attempt in range(_CONFLICT_ATTEMPTS):
            current = self.get_tenant(tenant) or {}
            have = list(current.get("allowedClusters") or [])
            missing = [c for c in allowed_clusters if c not in have]
            roles = list(current.get("adminRoles") or [])
            extra_roles = [r for r in admin_roles if r not in roles]
            if not (missing or extra_roles):
                return False
            body = {"adminRoles": roles + extra_roles, "allowedClusters": have + missing}
            self.request("POST", path, body, tolerate=(409,))  # 409: another writer won; read again
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
        raise BackendError(
            f"Pulsar admin: tenant {tenant!r} still lacks {missing or extra_roles} after {_CONFLICT_ATTEMPTS} "
            "updates (other parties were changing it at the same time)",
            status=409,
        )

    def delete_tenant(self, tenant: str) -> bool:
        """Delete an (empty) tenant; False when it did not exist."""
        status, _ = self.request("DELETE", f"/admin/v2/tenants/{_segment('tenant', tenant)}", tolerate=(404,))
        return status != 404

    # ------------------------------------------------------------------ namespaces
    def _ns_path(self, tenant: str, namespace: str) -> str:
        return f"/admin/v2/namespaces/{_segment('tenant', tenant)}/{_segment('namespace', namespace)}"

    def create_namespace(self, tenant: str, namespace: str, policies: Mapping[str, Any] | None = None) -> bool:
        """Create ``tenant/namespace`` (optionally with initial policies); False if it existed."""
        body = dict(policies) if policies is not None else _NO_BODY
        status, _ = self.request("PUT", self._ns_path(tenant, namespace), body, tolerate=(409,))
        return status != 409

    def namespace_exists(self, tenant: str, namespace: str) -> bool:
        status, _ = self.request("GET", self._ns_path(tenant, namespace), tolerate=(404,))
        return status != 404

    def get_namespace_policies(self, tenant: str, namespace: str) -> dict[str, Any]:
        _, payload = self.request("GET", self._ns_path(tenant, namespace))
        return dict(payload or {})

    def get_replication_clusters(self, tenant: str, namespace: str) -> list[str]:
        _, payload = self.request("GET", self._ns_path(tenant, namespace) + "/replication")
        return sorted(payload or [])

    def set_replication_clusters(self, tenant: str, namespace: str, clusters: Sequence[str]) -> None:
        self.request("POST", self._ns_path(tenant, namespace) + "/replication", list(clusters))

    def set_auto_topic_creation(self, tenant: str, namespace: str, allow: bool) -> None:
        """Whether producers, consumers and remote replicators may create topics in the namespace."""
        body = {"allowAutoTopicCreation": bool(allow), "topicType": "non-partitioned"}
        self.request("POST", self._ns_path(tenant, namespace) + "/autoTopicCreation", body)

    def set_retention(self, tenant: str, namespace: str, time_minutes: int, size_mb: int) -> None:
        """Retention of acknowledged messages; -1 means unlimited, 0 none."""
        body = {"retentionTimeInMinutes": int(time_minutes), "retentionSizeInMB": int(size_mb)}
        self.request("POST", self._ns_path(tenant, namespace) + "/retention", body)

    def set_message_ttl(self, tenant: str, namespace: str, seconds: int) -> None:
        """Unacknowledged messages older than this expire: the safety net for abandoned jobs."""
        self.request("POST", self._ns_path(tenant, namespace) + "/messageTTL", int(seconds))

    def set_publish_rate(self, tenant: str, namespace: str, msg_rate: int, byte_rate: int) -> None:
        """Per-topic publish throttling for the namespace; -1 disables a limit."""
        body = {"publishThrottlingRateInMsg": int(msg_rate), "publishThrottlingRateInByte": int(byte_rate)}
        self.request("POST", self._ns_path(tenant, namespace) + "/publishRate", body)

    def list_topics(self, tenant: str, namespace: str) -> list[str]:
        """Full names (``persistent://tenant/ns/topic``) of the namespace's persistent topics."""
        _, payload = self.request("GET", self._ns_path(tenant, namespace) + "/topics")
        return sorted(payload or [])

    def list_partitioned_topics(self, tenant: str, namespace: str) -> list[str]:
        """Full names of the namespace's partitioned topics (their partitions are in ``list_topics``)."""
        path = f"/admin/v2/persistent/{_segment('tenant', tenant)}/{_segment('namespace', namespace)}/partitioned"
        _, payload = self.request("GET", path)
        return sorted(payload or [])

    def delete_namespace(self, tenant: str, namespace: str) -> bool:
        """Delete the namespace and everything in it; False when it was already gone.

        Forced deletion first. A broker that refuses it (405: Pulsar's default
        ``forceDeleteNamespaceAllowed=false``) gets the namespace emptied and a plain DELETE,
        which Pulsar refuses (409) while a topic or a partitioned topic's metadata is left;
        a client still connected may re-create a topic in between, so empty and try again.
        """
        path = self._ns_path(tenant, namespace)
        status, _ = self.request("DELETE", path, query={"force": "true"}, tolerate=(404, 405))
        if status != 405:
            return status != 404
        for attempt in range(_DELETE_ATTEMPTS):
            try:
                # Partitioned topics first: deleting one takes its partitions along.
                for topic in self.list_partitioned_topics(tenant, namespace):
                    self.delete_partitioned_topic(topic)
                for topic in self.list_topics(tenant, namespace):
                    self.delete_topic(topic)
            except BackendError as exc:
                if exc.status == 404:  # the namespace went meanwhile (the deletions tolerate 404)
                    return False
                raise
            again = attempt + 1 < _DELETE_ATTEMPTS
            status, _ = self.request("DELETE", path, tolerate=(404, 409) if again else (404,))
            if status != 409:
                break
            time.sleep(0.1 * 2**attempt)
        return status != 404

    # ------------------------------------------------------------------ topics
    def delete_topic(self, topic: str) -> bool:
        """Delete ``persistent://tenant/ns/topic`` (or ``tenant/ns/topic``) with force.

        False when it did not exist. A loaded broker may take longer than ``timeout`` to delete
        a replicated topic and goes on after we stopped waiting; asked again meanwhile it answers
        500 "Topic is already fenced". Such a delete is asked again with a back-off until the
        topic is gone, for up to ``timeout`` seconds more.
        """
        deadline: float | None = None  # counted from the first failure: that one may be a timeout
        delay = 0.5
        while True:
            try:
                status, _ = self.request("DELETE", _topic_path(topic), query={"force": "true"}, tolerate=(404,))
                return status != 404
            except BackendError as exc:
                if deadline is None:
                    deadline = time.monotonic() + self.timeout
                if exc.status not in (500, None) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)  # a bounded back-off: the broker gives no event to wait on
            delay = min(delay * 2, 5.0)

    def delete_partitioned_topic(self, topic: str) -> bool:
        """Delete a partitioned topic, its partitions and its metadata, with force; False when it
        did not exist."""
        path = _topic_path(topic) + "/partitions"
        status, _ = self.request("DELETE", path, query={"force": "true"}, tolerate=(404,))
        return status != 404

    def get_topic_stats(self, topic: str) -> dict[str, Any] | None:
        """The topic's stats (``publishers``, ``subscriptions``, ``replication`` by remote cluster,
        ``msgInCounter``...); ``None`` when the topic does not exist."""
        status, payload = self.request("GET", _topic_path(topic) + "/stats", tolerate=(404,))
        return None if status == 404 else dict(payload or {})

    def last_unacked_message(self, topic: str, subscription: str) -> bytes | None:
        """The topic's last stored message, if ``subscription`` exists and has not acknowledged it.

        One call when there is nothing to read (no topic, no entry, the subscription is past it):
        the internal stats hold both the last entry's position and the subscription's cursor. A
        second call reads the message itself.
        """
        path = _topic_path(topic)
        status, stats = self.request("GET", path + "/internalStats", tolerate=(404,))
        if status == 404 or not isinstance(stats, dict):
            return None
        position = _last_entry(stats)
        cursor = (stats.get("cursors") or {}).get(subscription)
        if position is None or not isinstance(cursor, dict) or _acknowledged(position, cursor):
            return None
        status, body = self.request(
            "GET", f"{path}/ledger/{position[0]}/entry/{position[1]}", tolerate=(404,), raw=True
        )
        return None if status == 404 or not isinstance(body, bytes) else body


_POSITION = re.compile(r"(-?\d+):(-?\d+)")


def _last_entry(stats: Mapping[str, Any]) -> tuple[int, int] | None:
    """The position of the topic's last entry from its internal stats; None when it has none.

    ``lastConfirmedEntry`` is ``L:-1`` while ledger L, opened after a reload, is still empty: the
    last entry is then the last one of the newest earlier ledger that has any.
    """
    last = _POSITION.fullmatch(str(stats.get("lastConfirmedEntry", "")))
    if last is not None and int(last[2]) >= 0:
        return int(last[1]), int(last[2])
    ledgers = [x for x in stats.get("ledgers") or [] if isinstance(x, dict) and int(x.get("entries") or 0) > 0]
    if last is not None:
        ledgers = [x for x in ledgers if int(x.get("ledgerId", -1)) < int(last[1])]
    if not ledgers:
        return None
    newest = max(ledgers, key=lambda x: int(x["ledgerId"]))
    return int(newest["ledgerId"]), int(newest["entries"]) - 1


def _acknowledged(position: tuple[int, int], cursor: Mapping[str, Any]) -> bool:
    """Is ``position`` at or before the cursor's mark-delete position, or in one of its
    individually deleted ranges (``"[(l:e1..l:e2], ..."``: open below, closed above)?"""
    mark = _POSITION.fullmatch(str(cursor.get("markDeletePosition", "")))
    if mark is None:
        return True  # a cursor we cannot read: claim nothing is stored
    if position <= (int(mark[1]), int(mark[2])):
        return True
    found = [(int(a), int(b)) for a, b in _POSITION.findall(str(cursor.get("individuallyDeletedMessages", "")))]
    return any(lo < position <= hi for lo, hi in zip(found[::2], found[1::2], strict=False))


def _topic_path(topic: str) -> str:
    """``/admin/v2/{domain}/{tenant}/{ns}/{topic}`` for ``persistent://tenant/ns/topic`` or ``tenant/ns/topic``."""
    match = _TOPIC_RE.match(topic)
    if match is None:
        parts = topic.split("/")
        if len(parts) != 3 or "://" in topic:
            raise ConfigError(f"invalid Pulsar topic name {topic!r}: expected persistent://tenant/ns/topic")
        domain, tenant, namespace, local = "persistent", *parts
    else:
        domain, tenant, namespace, local = match.groups()
    return (
        f"/admin/v2/{domain}/{_segment('tenant', tenant)}/{_segment('namespace', namespace)}/"
        f"{urllib.parse.quote(local, safe='')}"
    )


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    if "json" in content_type or text[:1] in '[{"' or text.strip().lstrip("-").isdigit():
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _reason(payload: Any) -> str:
    if isinstance(payload, Mapping):
        reason = payload.get("reason") or payload.get("message") or payload.get("error")
        return str(reason) if reason else json.dumps(payload)
    if isinstance(payload, str):
        title = _HTML_TITLE_RE.search(payload)  # Jetty's error page: "<title>Error 401 Authentication required"
        return title.group(1) if title else payload.strip()[:500]
    return "" if payload is None else str(payload)


def _refusal(status: int, payload: Any, token: bool) -> str:
    """What a 401 or 403 means, put before the status in an error message.

    Pulsar's authentication filter refuses a missing or invalid token before any handler runs,
    with no ``{"reason": ...}`` body ("Authentication required" in Jetty's); a handler refuses a
    role it does not authorize with one ("Unauthorized to ...").
    """
    handler = isinstance(payload, Mapping) and "reason" in payload
    if status == 401 and (not handler or "authenticat" in _reason(payload).lower()):
        return "authentication failed (" + ("the broker rejected the token" if token else "no token given") + "), "
    if status in (401, 403):
        return "not authorized, "
    return ""
