"""A stateful fake of the Pulsar admin REST v2 API, for tests (pulsar-lite has no admin API).

The Pulsar backend's own control-plane tests run on the real broker (tests/test_pulsar_admin.py);
this fake serves the answers a standalone broker cannot give there (a 500, a 307 redirect) and
upper-layer tests that run on pulsar-lite (tests/test_cli.py, tests/test_fate_adapter.py).

It keeps clusters, tenants, namespaces (with their policies) and topics, and answers like a
Pulsar broker: 409 for a resource that exists, 404 for one that does not, 412 for an unknown
cluster, 204/200 on success, ``{"reason": "..."}`` bodies on errors. Every request is recorded
as a :class:`Recorded` (method, path, query, headers, decoded JSON body).

Knobs: ``ssl_context`` (serve HTTPS), ``token`` (require ``Authorization: Bearer <token>``,
else 401), ``allow_force_delete`` (False -> 405 on ``DELETE namespace?force=true``, like
``forceDeleteNamespaceAllowed=false``),
``fail(method, path, status, reason, applied=False)`` (answer the next matching call with an error;
``applied``: after carrying it out, as a broker does when another party's delete raced ours) and
``redirect_once(method, path)`` (answer the next matching call with a 307 to the same URL).

Usage::

    with FakePulsarAdmin() as fake:
        admin = PulsarAdmin(fake.url)
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

_NO_BODY: Any = object()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None  # decoded JSON, or None when the request had no body


@dataclass
class FakeState:
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)  # "tenant/ns" -> policies
    topics: set[str] = field(default_factory=set)  # full names persistent://t/ns/topic


class FakePulsarAdmin:
    """Threaded HTTP server on 127.0.0.1:<free port> speaking a subset of Pulsar admin v2."""

    def __init__(
        self,
        *,
        token: str | None = None,
        allow_force_delete: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.token = token
        self.ssl_context = ssl_context
        self.allow_force_delete = allow_force_delete
        self.state = FakeState()
        self.requests: list[Recorded] = []
        self._failures: list[tuple[str, str, int, str, bool]] = []
        self._redirects: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{port}"

    def start(self) -> FakePulsarAdmin:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if self.ssl_context is not None:
            # Handshake in the handler thread, so a client that rejects us cannot stall accept().
            self._server.socket = self.ssl_context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server.daemon_threads = True
        server = self._server
        # A short poll interval keeps shutdown() (and so every test teardown) quick.
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.02), name="fake-pulsar-admin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FakePulsarAdmin:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers
    def fail(self, method: str, path: str, status: int, reason: str, *, applied: bool = False) -> None:
        """Answer the next ``method path`` with ``status`` and ``{"reason": reason}``; with ``applied``
        the call takes effect first."""
        with self._lock:
            self._failures.append((method, path, status, reason, applied))

    def redirect_once(self, method: str, path: str) -> None:
        with self._lock:
            self._redirects.append((method, path))

    def add_topic(self, full_name: str) -> None:
        with self._lock:
            self.state.topics.add(full_name)

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every recorded request, in order."""
        with self._lock:
            return [(r.method, r.path) for r in self.requests]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------------ routing
    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests.append(Recorded(method, path, query, headers, None if body is _NO_BODY else body))
            for i, (m, p, status, reason, applied) in enumerate(self._failures):
                if m == method and p == path:
                    del self._failures[i]
                    if applied:
                        self._route(method, path, query, body)
                    return status, {"reason": reason}, {}
            if (method, path) in self._redirects and "redirected" not in query:
                self._redirects.remove((method, path))
                location = path + "?" + urllib.parse.urlencode({**query, "redirected": "1"})
                return 307, None, {"Location": location}
            if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                return 401, {"reason": "Authentication required"}, {}
            return self._route(method, path, query, body)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        parts = [urllib.parse.unquote(p) for p in path.split("/")[1:]]
        if parts[:2] != ["admin", "v2"] or len(parts) < 3:
            return 404, {"reason": "Not Found"}, {}
        kind, rest = parts[2], parts[3:]
        if kind == "clusters":
            return (*self._clusters(method, rest, body), {})
        if kind == "tenants":
            return (*self._tenants(method, rest, body), {})
        if kind == "namespaces":
            return (*self._namespaces(method, rest, query, body), {})
        if kind in ("persistent", "non-persistent"):
            return (*self._topics(kind, method, rest), {})
        return 404, {"reason": "Not Found"}, {}

    def _clusters(self, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
        st = self.state
        if not rest:
            return (200, sorted(st.clusters)) if method == "GET" else (405, {"reason": "Method Not Allowed"})
        name = rest[0]
        if method == "GET":
            return (200, st.clusters[name]) if name in st.clusters else (404, {"reason": "Cluster does not exist"})
        if method == "PUT":
            if name in st.clusters:
                return 409, {"reason": "Cluster already exists"}
            if not isinstance(body, dict):
                return 400, {"reason": "cluster data is required"}
            st.clusters[name] = body
            return 200, None
        if method == "POST":
            if name not in st.clusters:
                return 404, {"reason": "Cluster does not exist"}
            st.clusters[name] = body
            return 200, None
        if method == "DELETE":
            if name not in st.clusters:
                return 404, {"reason": "Cluster does not exist"}
            del st.clusters[name]
            return 204, None
        return 405, {"reason": "Method Not Allowed"}

    def _tenants(self, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
        st = self.state
        if not rest:
            return (200, sorted(st.tenants)) if method == "GET" else (405, {"reason": "Method Not Allowed"})
        name = rest[0]
        if method == "GET":
            return (200, st.tenants[name]) if name in st.tenants else (404, {"reason": "Tenant does not exist"})
        if method in ("PUT", "POST"):
            if method == "PUT" and name in st.tenants:
                return 409, {"reason": "Tenant already exists"}
            if method == "POST" and name not in st.tenants:
                return 404, {"reason": "Tenant does not exist"}
            clusters = (body or {}).get("allowedClusters") or []
            unknown = [c for c in clusters if c not in st.clusters]
            if unknown:
                return 412, {"reason": f"Clusters {unknown} do not exist"}
            st.tenants[name] = {
                "adminRoles": (body or {}).get("adminRoles") or [],
                "allowedClusters": clusters,
            }
            return 204, None
        if method == "DELETE":
            if name not in st.tenants:
                return 404, {"reason": "Tenant does not exist"}
            if any(ns.split("/")[0] == name for ns in st.namespaces):
                return 409, {"reason": "The tenant still has active namespaces"}
            del st.tenants[name]
            return 204, None
        return 405, {"reason": "Method Not Allowed"}

    def _namespaces(self, method: str, rest: list[str], query: dict[str, str], body: Any) -> tuple[int, Any]:
        st = self.state
        if len(rest) < 2:
            return 404, {"reason": "Not Found"}
        tenant, ns = rest[0], rest[1]
        key = f"{tenant}/{ns}"
        sub = rest[2] if len(rest) > 2 else None
        if sub is None and method == "PUT":
            if tenant not in st.tenants:
                return 404, {"reason": "Tenant does not exist"}
            if key in st.namespaces:
                return 409, {"reason": "Namespace already exists"}
            st.namespaces[key] = dict(body) if isinstance(body, dict) else {}
            return 204, None
        if key not in st.namespaces:
            return 404, {"reason": "Namespace does not exist"}
        policies = st.namespaces[key]
        mine = sorted(t for t in st.topics if t.split("://", 1)[1].rsplit("/", 1)[0] == key)
        if sub is None and method == "GET":
            return 200, policies
        if sub is None and method == "DELETE":
            force = query.get("force") == "true"
            if force and not self.allow_force_delete:
                return 405, {"reason": "Broker doesn't allow forced deletion of namespaces"}
            if mine and not force:
                return 409, {"reason": "Cannot delete non empty namespace"}
            st.topics.difference_update(mine)
            del st.namespaces[key]
            return 204, None
        if sub == "topics" and method == "GET":
            return 200, mine
        if method == "POST" and sub == "replication":
            if not isinstance(body, list):
                return 400, {"reason": "a list of clusters is required"}
            unknown = [c for c in body if c not in st.clusters]
            if unknown:
                return 412, {"reason": f"Invalid cluster id: {unknown[0]}"}
            policies["replication_clusters"] = body
            return 204, None
        if method == "POST" and sub == "retention":
            policies["retention_policies"] = body
            return 204, None
        if method == "POST" and sub == "messageTTL":
            if not isinstance(body, int) or body < 0:
                return 412, {"reason": "Invalid value for message TTL"}
            policies["message_ttl_in_seconds"] = body
            return 204, None
        if method == "POST" and sub == "publishRate":
            policies["publishMaxMessageRate"] = body
            return 204, None
        if method == "POST" and sub == "autoTopicCreation":
            policies["autoTopicCreationOverride"] = body
            return 204, None
        return 405, {"reason": "Method Not Allowed"}

    def _topics(self, domain: str, method: str, rest: list[str]) -> tuple[int, Any]:
        st = self.state
        if len(rest) != 3:
            return 404, {"reason": "Not Found"}
        full = f"{domain}://{rest[0]}/{rest[1]}/{rest[2]}"
        if f"{rest[0]}/{rest[1]}" not in st.namespaces:
            return 404, {"reason": "Namespace does not exist"}
        if rest[2] == "partitioned" and method == "GET":
            return 200, []  # the fake keeps no partitioned topics
        if method == "PUT":
            if full in st.topics:
                return 409, {"reason": "This topic already exists"}
            st.topics.add(full)
            return 204, None
        if method == "DELETE":
            if full not in st.topics:
                return 404, {"reason": "Topic not found"}
            st.topics.discard(full)
            return 204, None
        return 405, {"reason": "Method Not Allowed"}


def _make_handler(fake: FakePulsarAdmin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parsed.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = _NO_BODY
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._reply(400, {"reason": "Malformed JSON"}, {})
                    return
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload, extra = fake.handle(self.command, parsed.path, query, headers, body)
            self._reply(status, payload, extra)

        def _reply(self, status: int, payload: Any, extra: dict[str, str]) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            # Keep pytest output clean; the recorded requests are the log.
            return

    return Handler
