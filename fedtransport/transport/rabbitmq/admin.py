"""RabbitMQ management HTTP API client, used by the backend's control plane (``management``).

Standard library only (``urllib``). One ``RabbitAdmin`` per broker::

    admin = RabbitAdmin("http://127.0.0.1:15672", "admin", "secret")
    admin.put_vhost("job-1")
    admin.put_user("job-1-guest", "pw")
    admin.set_permissions("job-1", "job-1-guest", "^job-1\\.", "^job-1\\.", "^job-1\\.")
    admin.put_federation_upstream("job-1", "from-host", "amqp://u:p@host-broker:5672/job-1")
    admin.put_policy("job-1", "federate", "^job-1\\.", {"federation-upstream": "from-host"})
    admin.wait_federation_links("job-1", upstream="from-host")

Behaviour
  * Virtual host and other names are URL-encoded in paths ("/" becomes ``%2F``).
  * Deletes are idempotent: a 404 (already gone) is not an error. Two deletes of one thing at
    once (two parties of a job cleaning up on one broker) may answer 500 to one of them: a delete
    that fails with 409 or 5xx reads the thing back and is done when it is gone, else asked again
    (at most 5 times, with a back-off).
  * Any other non-2xx answer raises ``BackendError`` naming the method, the path and the HTTP
    status, with ``status`` set and ``broker_message`` holding RabbitMQ's own ``reason`` (made
    readable: HTML entities unescaped, Erlang character lists turned back into text).
  * An unreachable API raises ``BackendError`` naming the URL.
  * HTTP proxies from the environment are not used: the management API is reached directly.

Options: ``ssl_context`` (an ``ssl.SSLContext`` for an ``https://`` base URL), ``timeout``
(seconds per request, default 30).
"""

from __future__ import annotations

import base64
import contextlib
import html
import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from ...errors import BackendError, ConfigError

__all__ = ["DEFAULT_FEDERATION_PREFETCH", "RabbitAdmin"]

# Bounded on purpose: RabbitMQ's default of 1000 unacked 4 MiB chunks would be ~4 GiB in flight.
DEFAULT_FEDERATION_PREFETCH = 64
_DELETE_ATTEMPTS = 5  # a delete that raced another delete of the same thing


def _seg(name: str) -> str:
    """One URL path segment: everything escaped, so "/" becomes %2F."""
    return quote(name, safe="")


def _readable(term: Any) -> str:
    """RabbitMQ's ``reason`` as text: Erlang terms arrive as JSON lists of char codes."""
    if isinstance(term, str):
        return html.unescape(term).strip()
    if isinstance(term, list):
        if term and all(isinstance(c, int) and 9 <= c < 0x110000 for c in term):
            return "".join(chr(c) for c in term)
        return "[" + ", ".join(_readable(t) for t in term) + "]"
    if isinstance(term, dict):
        return "{" + ", ".join(f"{k}: {_readable(v)}" for k, v in term.items()) + "}"
    return json.dumps(term)


class RabbitAdmin:
    """Client of one broker's management HTTP API (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        user: str,
        password: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> None:
        base = base_url.rstrip("/")
        if base.endswith("/api"):
            base = base[: -len("/api")]
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"RabbitMQ management URL {base_url!r} must start with http:// or https://")
        self.base_url = base
        self.user = user
        self.timeout = float(timeout)
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self._auth = f"Basic {token}"
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"RabbitAdmin({self.base_url!r}, user={self.user!r})"

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        """Call ``METHOD /api/...``; return the decoded JSON answer (None for an empty one).

        ``path`` starts with ``/api/`` and is already encoded. With ``missing_ok`` a 404
        returns None instead of raising.
        """
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Accept", "application/json")
        if data is not None or method in ("PUT", "POST"):
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise self._http_error(method, path, exc) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, refused, timeout, reset
            why = getattr(exc, "reason", exc)
            raise BackendError(
                f"RabbitMQ management API at {self.base_url} is unreachable ({method} {path}): {why}",
                broker_message=str(why),
            ) from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise BackendError(
                f"RabbitMQ management {method} {path} answered with something that is not JSON",
                broker_message=raw[:500].decode(errors="replace"),
            ) from None

    def _delete(self, path: str) -> None:
        """DELETE ``path``; done when it is gone, whoever deleted it (see the module docstring)."""
        for attempt in range(_DELETE_ATTEMPTS):
            try:
                self.request("DELETE", path, missing_ok=True)
                return
            except BackendError as exc:
                if exc.status is None or (exc.status != 409 and exc.status < 500):
                    raise
                if self.request("GET", path, missing_ok=True) is None:
                    return  # a concurrent delete won
                if attempt + 1 == _DELETE_ATTEMPTS:
                    raise
            time.sleep(0.1 * 2**attempt)

    @staticmethod
    def _http_error(method: str, path: str, exc: urllib.error.HTTPError) -> BackendError:
        raw = b""
        with contextlib.suppress(OSError):
            raw = exc.read()
        error, reason = "", ""
        try:
            doc = json.loads(raw)
            if isinstance(doc, dict):
                error = _readable(doc.get("error", ""))
                reason = _readable(doc.get("reason", ""))
        except ValueError:
            reason = raw[:500].decode(errors="replace").strip()
        reason = reason or error or str(exc.reason)
        label = f"{error}: {reason}" if error and error != reason else reason
        label = " ".join(label.split())  # one line in logs
        return BackendError(
            f"RabbitMQ management {method} {path} failed with HTTP {exc.code}: {label}",
            broker_message=reason,
            status=exc.code,
        )

    def _object(self, path: str) -> dict[str, Any]:
        """``GET path`` for one JSON object."""
        return self._shaped(path, self.request("GET", path))

    def _found(self, path: str) -> dict[str, Any] | None:
        """``GET path`` for one JSON object; None when there is none (a 404)."""
        doc = self.request("GET", path, missing_ok=True)
        return None if doc is None else self._shaped(path, doc)

    def _shaped(self, path: str, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise self._shape_error(path, "an object", doc)
        return doc

    def _list(self, path: str) -> list[dict[str, Any]]:
        """``GET path`` for a JSON list of objects."""
        docs = self.request("GET", path)
        if not (isinstance(docs, list) and all(isinstance(d, dict) for d in docs)):
            raise self._shape_error(path, "a list of objects", docs)
        return docs

    def _shape_error(self, path: str, wanted: str, doc: Any) -> BackendError:
        return BackendError(
            f"RabbitMQ management GET {path} answered with {type(doc).__name__}, not {wanted}",
            broker_message=json.dumps(doc)[:500],
        )

    # ------------------------------------------------------------------ broker

    def overview(self) -> dict[str, Any]:
        """``GET /api/overview``: versions, node name, listeners, totals."""
        return self._object("/api/overview")

    def whoami(self) -> dict[str, Any]:
        return self._object("/api/whoami")

    def nodes(self) -> list[dict[str, Any]]:
        return self._list("/api/nodes")

    def extensions(self) -> list[dict[str, Any]]:
        """``GET /api/extensions``: management UI extensions (``federation.js`` means the
        federation management plugin is on)."""
        return self._list("/api/extensions")

    def enabled_plugins(self, *, wait: float = 15.0) -> set[str]:
        """Plugins enabled on every node (``enabled_plugins`` of ``GET /api/nodes``).

        A node's details appear with its first statistics sample, up to 5 s after boot: wait up
        to ``wait`` seconds for them.
        """
        deadline = time.monotonic() + wait
        delay = 0.1
        while True:
            nodes = self.nodes()
            if nodes and all("enabled_plugins" in node for node in nodes):
                plugins = set(nodes[0]["enabled_plugins"])
                for node in nodes[1:]:
                    plugins &= set(node["enabled_plugins"])
                return plugins
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"RabbitMQ at {self.base_url} reports no node details after {wait:.0f} s "
                    "(management statistics disabled?): cannot tell which plugins are enabled"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def require_plugins(self, *names: str, wait: float = 15.0) -> None:
        """Raise ``BackendError`` naming the plugins that are not enabled, and the fix."""
        missing = sorted(set(names) - self.enabled_plugins(wait=wait))
        if missing:
            raise BackendError(
                f"RabbitMQ at {self.base_url} lacks plugin(s) {', '.join(missing)}; "
                f"enable them with: rabbitmq-plugins enable {' '.join(missing)}"
            )

    # ------------------------------------------------------------------ vhosts

    def put_vhost(self, vhost: str, *, description: str | None = None, tags: str | None = None) -> None:
        """Create a virtual host (no error if it exists)."""
        body: dict[str, Any] = {}
        if description is not None:
            body["description"] = description
        if tags is not None:
            body["tags"] = tags
        self.request("PUT", f"/api/vhosts/{_seg(vhost)}", body)

    def get_vhost(self, vhost: str) -> dict[str, Any] | None:
        return self._found(f"/api/vhosts/{_seg(vhost)}")

    def delete_vhost(self, vhost: str) -> None:
        """Delete a virtual host with everything in it; idempotent."""
        self._delete(f"/api/vhosts/{_seg(vhost)}")

    def list_vhosts(self) -> list[dict[str, Any]]:
        return self._list("/api/vhosts")

    # ------------------------------------------------------------------ users and permissions

    def put_user(self, name: str, password: str, tags: str | Iterable[str] = "") -> None:
        """Create or update a user; ``tags`` e.g. "administrator" or "" (AMQP access only)."""
        tag_text = tags if isinstance(tags, str) else ",".join(tags)
        self.request("PUT", f"/api/users/{_seg(name)}", {"password": password, "tags": tag_text})

    def get_user(self, name: str) -> dict[str, Any] | None:
        return self._found(f"/api/users/{_seg(name)}")

    def delete_user(self, name: str) -> None:
        """Delete a user; idempotent."""
        self._delete(f"/api/users/{_seg(name)}")

    def list_users(self) -> list[dict[str, Any]]:
        return self._list("/api/users")

    def set_permissions(
        self, vhost: str, user: str, configure: str = ".*", write: str = ".*", read: str = ".*"
    ) -> None:
        """Grant ``user`` the three permission regexes on ``vhost`` (replaces earlier ones)."""
        body = {"configure": configure, "write": write, "read": read}
        self.request("PUT", f"/api/permissions/{_seg(vhost)}/{_seg(user)}", body)

    def get_permissions(self, vhost: str, user: str) -> dict[str, Any] | None:
        return self._found(f"/api/permissions/{_seg(vhost)}/{_seg(user)}")

    def list_permissions(self, vhost: str | None = None) -> list[dict[str, Any]]:
        if vhost is None:
            return self._list("/api/permissions")
        return self._list(f"/api/vhosts/{_seg(vhost)}/permissions")

    # ------------------------------------------------------------------ parameters and federation

    def put_parameter(self, component: str, vhost: str, name: str, value: Any) -> None:
        body = {"vhost": vhost, "component": component, "name": name, "value": value}
        self.request("PUT", f"/api/parameters/{_seg(component)}/{_seg(vhost)}/{_seg(name)}", body)

    def get_parameter(self, component: str, vhost: str, name: str) -> dict[str, Any] | None:
        path = f"/api/parameters/{_seg(component)}/{_seg(vhost)}/{_seg(name)}"
        return self._found(path)

    def delete_parameter(self, component: str, vhost: str, name: str) -> None:
        path = f"/api/parameters/{_seg(component)}/{_seg(vhost)}/{_seg(name)}"
        self._delete(path)

    def list_parameters(self, component: str | None = None, vhost: str | None = None) -> list[dict[str, Any]]:
        """Vhost-scoped parameters, optionally of one component (and one vhost)."""
        if component is None:
            if vhost is not None:
                raise ConfigError("list_parameters: a vhost needs a component")
            return self._list("/api/parameters")
        if vhost is None:
            return self._list(f"/api/parameters/{_seg(component)}")
        return self._list(f"/api/parameters/{_seg(component)}/{_seg(vhost)}")

    def put_federation_upstream(
        self,
        vhost: str,
        name: str,
        uri: str | list[str],
        *,
        ack_mode: str = "on-confirm",
        prefetch_count: int = DEFAULT_FEDERATION_PREFETCH,
        **extra: Any,
    ) -> dict[str, Any]:
        """Define upstream ``name`` in ``vhost`` (the broker that *pulls* from ``uri``).

        ``extra`` takes further upstream keys with ``_`` for ``-`` (``reconnect_delay=5``,
        ``max_hops=1``, ``queue="q"``, ``expires=...``, ``message_ttl=...``,
        ``trust_user_id=True``). Returns the value that was sent.
        """
        if ack_mode not in ("on-confirm", "on-publish", "no-ack"):
            raise ConfigError(f"ack_mode {ack_mode!r} must be on-confirm, on-publish or no-ack")
        value: dict[str, Any] = {"uri": uri, "ack-mode": ack_mode, "prefetch-count": int(prefetch_count)}
        for key, val in extra.items():
            if val is not None:
                value[key.replace("_", "-")] = val
        self.put_parameter("federation-upstream", vhost, name, value)
        return value

    def get_federation_upstream(self, vhost: str, name: str) -> dict[str, Any] | None:
        return self.get_parameter("federation-upstream", vhost, name)

    def delete_federation_upstream(self, vhost: str, name: str) -> None:
        """Delete an upstream (its links stop); idempotent."""
        self.delete_parameter("federation-upstream", vhost, name)

    def list_federation_upstreams(self, vhost: str | None = None) -> list[dict[str, Any]]:
        return self.list_parameters("federation-upstream", vhost)

    def federation_links(self, vhost: str | None = None) -> list[dict[str, Any]]:
        """Status of federation links (``status`` is "starting", "running", "error"...).

        Needs the ``rabbitmq_federation_management`` plugin.
        """
        if vhost is None:
            return self._list("/api/federation-links")
        return self._list(f"/api/federation-links/{_seg(vhost)}")

    def wait_federation_links(
        self,
        vhost: str,
        *,
        upstream: str | None = None,
        count: int = 1,
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` links of ``vhost`` (of ``upstream`` if given) are ``running``.

        Raises ``BackendError`` on timeout with the links' statuses and errors.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            links = [
                link for link in self.federation_links(vhost) if upstream is None or link.get("upstream") == upstream
            ]
            running = [link for link in links if link.get("status") == "running"]
            if len(running) >= count:
                return running
            if time.monotonic() >= deadline:
                seen = (
                    "; ".join(
                        f"{link.get('type', '?')} {link.get('queue') or link.get('exchange') or '?'} "
                        f"from {link.get('upstream', '?')}: {link.get('status', '?')}"
                        + (f" ({_readable(link['error'])})" if link.get("error") else "")
                        for link in links
                    )
                    or "no links (is a policy with federation-upstream applied to an existing queue?)"
                )
                raise BackendError(
                    f"federation links in vhost {vhost!r} on {self.base_url} not running after "
                    f"{timeout:.0f} s ({len(running)} of {count}): {seen}",
                    broker_message=seen,
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    # ------------------------------------------------------------------ policies

    def put_policy(
        self,
        vhost: str,
        name: str,
        pattern: str,
        definition: Mapping[str, Any],
        apply_to: str = "queues",
        priority: int = 0,
    ) -> None:
        """Create or replace policy ``name``: ``definition`` applies to names matching ``pattern``."""
        if apply_to not in ("queues", "exchanges", "all"):
            raise ConfigError(f"apply_to {apply_to!r} must be queues, exchanges or all")
        body = {
            "pattern": pattern,
            "definition": dict(definition),
            "apply-to": apply_to,
            "priority": priority,
        }
        self.request("PUT", f"/api/policies/{_seg(vhost)}/{_seg(name)}", body)

    def delete_policy(self, vhost: str, name: str) -> None:
        """Delete a policy; idempotent."""
        self._delete(f"/api/policies/{_seg(vhost)}/{_seg(name)}")

    def list_policies(self, vhost: str | None = None) -> list[dict[str, Any]]:
        if vhost is None:
            return self._list("/api/policies")
        return self._list(f"/api/policies/{_seg(vhost)}")

    # ------------------------------------------------------------------ queues

    def list_queues(self, vhost: str | None = None) -> list[dict[str, Any]]:
        """Queues with their counters (``messages``, ``messages_ready``, ``consumers``...).

        The counters are statistics: they lag the broker by up to the stats interval (5 s).
        """
        if vhost is None:
            return self._list("/api/queues")
        return self._list(f"/api/queues/{_seg(vhost)}")

    def get_queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        return self._found(f"/api/queues/{_seg(vhost)}/{_seg(name)}")

    def delete_queue(self, vhost: str, name: str) -> None:
        """Delete a queue and its messages; idempotent."""
        self._delete(f"/api/queues/{_seg(vhost)}/{_seg(name)}")
