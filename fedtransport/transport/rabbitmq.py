"""RabbitMQ backend: pika data plane, management HTTP API control plane.

Features
    * A virtual host per job, ``{vhost_prefix}{job_id}``, and a user per party and job,
      ``{vhost}:{role}:{party_id}``, whose permissions cover only that vhost and, inside it,
      only the party's own queues and exchange (configure), its exchange
      ``{job_id}:{role}:{party_id}``, to which only its outgoing queues are bound (write: it
      cannot publish into another pair's queue), and the queues addressed to it (read). The data plane connects
      as that user, never as the admin. Its password is derived from the admin password
      (HMAC-SHA256), so every process of a party (Spark executors, a restarted receiver)
      computes the same one without storing it.
    * Queues ``{job_id}:{src_role}:{src_id}:{dst_role}:{dst_id}:{lane}``: parties x lanes per
      job, never one per variable or partition. ``:`` cannot occur in job ids, roles or party
      ids, so a name maps back to exactly one (src, dst, lane). Durable queues, persistent
      messages (delivery mode 2). The sender declares the destination queue too, so what is
      sent before the receiver listens is kept.
    * Publisher confirms with a bounded window (``send_window`` unconfirmed messages per
      ``send``): the sender blocks on the window, never buffers a lazy message stream, and
      ``send`` returns once every message is confirmed. A nack, a returned (unroutable)
      message or a channel error raises ``BackendError`` with the broker's reply text.
    * Consumers with manual acknowledgement and a per-lane prefetch (the channel's qos), one
      channel per (source, lane), each handing its deliveries to a thread of its own so that
      checking and placing messages runs in parallel across lanes, off pika's I/O thread.
      The qos adapts to message sizes (``prefetch_bytes``) and grows by what the receiver
      holds unacknowledged (``make_room``), so a lane never stalls behind data nobody asked
      for yet and nothing is acknowledged before its transfer is handed over
      (``max_unacked_per_lane`` is ``prefetch``). ``redeliver`` is ``basic.recover(requeue=True)``
      on that lane's channel; acknowledgements of deliveries made before it are dropped
      (their messages come again and are deduplicated above). No cancel-and-requeue per get.
    * One connection per session, owned by one I/O thread running pika's asynchronous
      ``SelectConnection`` IOLoop: every channel operation happens on that thread; ``send``,
      ``ack``, ``listen`` and ``redeliver`` hand work over with ``add_callback_threadsafe``.
    * Reconnects with bounded exponential back-off when the connection drops (node
      restarted): channels, queues and consumers come back and unconfirmed messages are
      published again (duplicates are dropped by the framing layer). A ``send`` that sees no
      confirm for ``send_timeout`` seconds raises ``BackendError`` naming the last
      connection problem.
    * Modes: ``shared`` (every party on one broker) and ``federated``: each party declares
      its queues on its own broker and publishes there; the receiving broker pulls with the
      federation plugin. Per job and remote party, the receiver creates one upstream
      ``from:{role}:{party_id}`` (URI from the route table, ``ack-mode: on-confirm``, bounded
      ``prefetch-count``) and one policy ``federate:{role}:{party_id}`` matching the queues
      from that party to itself. Parties behind an SNI proxy (route table ``proxy``) are
      reached with ``amqps://proxy?...&server_name_indication={party host}``.
    * Upstream credentials: with a job ``secret`` (the common option every party sets for
      sealing), the sender creates on its own broker, per receiving party, a link user
      ``{vhost}:link:{src_role}:{src_id}:{dst_role}:{dst_id}`` that may only read (and
      declare) the queues towards that party; both sides derive its password from the
      secret (HMAC-SHA256), so no admin credential leaves a party. Without a secret, the
      upstream uses the remote broker's admin credentials from ``peer_credentials``, else
      this party's own admin ``user``/``password`` (FATE's convention of one admin account
      on every broker); a warning says so.
    * TLS: ``ssl`` gives an ``ssl.SSLContext`` (CA, optional client certificate) with host
      name checking against ``server_hostname``; federation upstreams use ``amqps://`` with
      ``verify_peer`` and ``server_name_indication``.
    * ``ttl_seconds``: a policy expires queues unused for that long, the safety net for a
      scheduler that never calls cleanup. ``cleanup()`` (idempotent, also after ``close()``)
      deletes the job's policies, upstreams, vhost and users (its own and every job user
      with permissions on the vhost) on this party's broker.

Connection options (``options=`` of ``Federation.connect``) and defaults
    ``host``                        ``"127.0.0.1"``: this party's broker
    ``port``                        ``5672``; the AMQPS port when ``ssl`` is given
    ``mng_port``                    ``15672``: management API, ``http://{host}:{mng_port}``
    ``user`` / ``password``         ``"guest"`` / ``"guest"``: admin credentials for the
                                    management API (never used on the data plane)
    ``mode``                        ``"shared"`` | ``"federated"`` (needs a route table)
    ``ssl``                         ``None``, or ``{"ca_file", "cert_file", "key_file",
                                    "server_hostname"}`` (all optional; server_hostname
                                    defaults to ``host``)
    ``prefetch``                    ``4`` unacknowledged deliveries per lane consumer, the
                                    floor, sized for full (4 MiB) messages
    ``prefetch_bytes``              ``16 MiB``: the qos rises above ``prefetch`` while messages
                                    are small, to keep about this much in flight per lane
    ``prefetch_max``                ``64``: the ceiling of that qos
    ``send_window``                 ``8`` unconfirmed messages per ``send`` (one lane of one transfer)
    ``send_window_bytes``           ``8 MiB`` unconfirmed per ``send``: what bounds a sender's memory
    ``send_timeout``                ``60.0`` seconds without a confirm before ``send`` fails
    ``connect_timeout``             ``30.0`` seconds for the first connection and channel setup
    ``heartbeat``                   ``60`` seconds (AMQP heartbeat; 0 disables)
    ``blocked_connection_timeout``  ``300.0`` seconds blocked by a broker alarm before the
                                    connection is dropped and made again
    ``reconnect_max_delay``         ``5.0`` seconds: cap of the reconnect back-off
    ``vhost_prefix``                ``"fedtransport-"``: must be the same for every party
    ``ttl_seconds``                 ``172800``: queues unused this long expire
    ``federation_prefetch``         ``16``: messages a federation link has in flight
    ``federation_ssl``              ``None``: like ``ssl`` (TLS upstreams when ``ssl`` is set);
                                    ``False``: plain ``amqp://``; or ``{"ca_file", "cert_file",
                                    "key_file"}`` as paths the *broker* can read
    ``peer_credentials``            ``{}``: ``{party_id: {"user": ..., "password": ...}}`` admin
                                    credentials of remote brokers (federated mode, no secret)
    ``secret``                      the common job secret, also read here (see above)

Errors
    ``BackendError`` carrying the broker's reply text (connection refused, access refused,
    TLS failures, nacks, returns, channel errors) or the management API's status and reason;
    ``ConfigError`` for inconsistent options; ``RouteError`` for a party the route table
    cannot resolve or reach.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import itertools
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from queue import SimpleQueue
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop, SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from ..errors import BackendError, ConfigError, RouteError
from ..party import Party
from ..routing import is_ip
from .base import DeliverFn, Delivery, JobContext, Transport
from .rabbitmq_admin import RabbitAdmin

__all__ = ["RabbitTransport"]

log = logging.getLogger("fedtransport.rabbitmq")
_pika_log = logging.getLogger("pika")
if _pika_log.level == logging.NOTSET:
    # pika logs every lost connection at ERROR with stack traces; we report connection
    # problems ourselves (WARNING, with the broker's reply text) and retry.
    _pika_log.setLevel(logging.CRITICAL)

_MODES = ("shared", "federated")
_SSL_KEYS = frozenset({"ca_file", "cert_file", "key_file", "server_hostname"})
_FED_SSL_KEYS = frozenset({"ca_file", "cert_file", "key_file"})
_EXPIRY_POLICY = "fedtransport-expiry"
_RETRY_FIRST = 0.2  # seconds: first reconnect / channel re-open delay, doubled up to the cap
_FIRST_REFUSALS = 5  # times the first connection is tried again when the broker refuses the job user
_UPSTREAM_RECONNECT = 1  # seconds between a federation link's reconnect attempts
_CLOSE_WAIT = 15.0  # seconds close() waits for the I/O thread to say goodbye to the broker
_VHOST_PREFIX = re.compile(r"[A-Za-z0-9_.-]{0,64}")


def _derive(key: bytes, label: str, name: str) -> str:
    """A password only holders of ``key`` can compute: HMAC-SHA256 over a label and a name."""
    digest = hmac.new(key, f"fedtransport/rabbitmq/{label}\0{name}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _reason(exc: BaseException | None) -> str:
    """pika's exceptions as one readable line (they nest the broker's reply text)."""
    if exc is None:
        return "unknown reason"
    if isinstance(exc, (pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed)):
        return f"{exc.reply_code} {exc.reply_text}"
    attempts = getattr(exc, "exceptions", None)  # a failed connection workflow: its attempts
    if attempts:
        return _reason(attempts[-1])
    cause = getattr(exc, "exception", None)  # one phase of an attempt: TCP, TLS or AMQP handshake
    if isinstance(cause, BaseException):
        return _reason(cause)
    if exc.args and isinstance(exc.args[0], BaseException):  # AMQPConnectionError(workflow error)
        return _reason(exc.args[0])
    return f"{type(exc).__name__}: {exc}"


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    """Callbacks run inside pika's IOLoop: an exception there would end the I/O thread."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("RabbitMQ I/O callback %s failed", getattr(fn, "__name__", fn))

    return wrapper


class _Send:
    """One ``send`` call: its window of unconfirmed messages, shared with the I/O thread."""

    def __init__(self, op_id: int, queue: str) -> None:
        self.id = op_id
        self.queue = queue
        self.cond = threading.Condition()
        self.unconfirmed: dict[int, bytes] = {}  # index -> body, until the broker confirms it
        self.sent_on: dict[int, int] = {}  # index -> publisher channel it went out on (I/O thread)
        self.error: str | None = None
        self.progress = time.monotonic()

    def fail(self, why: str) -> None:
        with self.cond:
            if self.error is None:
                self.error = why
            self.cond.notify_all()


class _Consumer:
    """One (source, lane) consumer; its channel and epoch live on the I/O thread.

    Deliveries are handed to a thread of the consumer's own, so checking and placing a
    message (CRC, copy, decompress) runs in parallel across lanes and never holds up
    pika's single I/O thread, which keeps reading sockets and sending acks meanwhile.
    The hand-off queue is bounded by the channel's qos: the broker sends no more until acked.
    """

    def __init__(self, src: Party, lane: int, queue: str, deliver: DeliverFn) -> None:
        self.src = src
        self.lane = lane
        self.queue = queue
        self.deliver = deliver
        self.handoff: SimpleQueue[Delivery | None] = SimpleQueue()
        self.worker = threading.Thread(target=self._work, name=f"ft-rabbit-recv-{src}-{lane}", daemon=True)
        self.worker.start()
        self.channel: Channel | None = None
        self.epoch = 0  # tokens of any other epoch are stale: their channel closed or recovered
        self.recovering = False  # basic.recover sent, recover-ok not yet received
        self.ready = threading.Event()  # consume-ok received at least once, or failed
        self.error: str | None = None
        self.retry = _RETRY_FIRST
        self.timer: Any = None
        self.qos = 0  # the prefetch count for the traffic (see _adapt_qos)
        self.held = 0  # deliveries the inbox holds unacknowledged, allowed on top (make_room)
        self.mean_size = 0.0  # recent message size, for the qos

    def _work(self) -> None:
        while (d := self.handoff.get()) is not None:
            try:
                self.deliver(d)
            except Exception:  # the inbox never raises; a bug must not kill the lane
                log.exception("delivering a message from %s on lane %d failed", self.src, self.lane)

    def stop(self) -> None:
        self.handoff.put(None)


class RabbitTransport(Transport):
    name: ClassVar[str] = "rabbitmq"
    option_defaults: ClassVar[dict[str, Any]] = {
        "host": "127.0.0.1",
        "port": 5672,
        "mng_port": 15672,
        "user": "guest",
        "password": "guest",
        "mode": "shared",
        "ssl": None,
        "prefetch": 4,
        "prefetch_bytes": 16 << 20,
        "prefetch_max": 64,
        "send_window": 8,
        "send_window_bytes": 8 << 20,
        "send_timeout": 60.0,
        "connect_timeout": 30.0,
        "heartbeat": 60,
        "blocked_connection_timeout": 300.0,
        "reconnect_max_delay": 5.0,
        "vhost_prefix": "fedtransport-",
        "ttl_seconds": 172800,
        "federation_prefetch": 16,
        "federation_ssl": None,
        "peer_credentials": {},
        # The common job secret (also validated there): declared so that it reaches this
        # backend, which derives the federation link passwords from it.
        "secret": None,
    }

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        o = ctx.options
        self.mode = o["mode"]
        if self.mode not in _MODES:
            raise ConfigError(f"option 'mode' must be one of {_MODES}, got {self.mode!r}")
        if self.mode == "federated" and ctx.route_table is None:
            raise ConfigError("RabbitMQ mode 'federated' needs a route_table to find the other parties' brokers")
        for key in ("port", "mng_port"):
            self._check_int(key, 1, 65535)
        for key, lo, hi in (
            ("prefetch", 1, 65535),
            ("prefetch_max", 1, 65535),
            ("prefetch_bytes", 1, 1 << 40),
            ("send_window", 1, 1 << 16),
            ("send_window_bytes", 1, 1 << 40),
            ("heartbeat", 0, 3600),
            ("ttl_seconds", 1, 1 << 31),
            ("federation_prefetch", 1, 65535),
        ):
            self._check_int(key, lo, hi)
        for key in ("send_timeout", "connect_timeout", "blocked_connection_timeout", "reconnect_max_delay"):
            value = o[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"option {key!r} must be a positive number of seconds, got {value!r}")
        for key in ("host", "user", "password"):
            if not isinstance(o[key], str) or not o[key]:
                raise ConfigError(f"option {key!r} must be a non-empty string, got {o[key]!r}")
        prefix = o["vhost_prefix"]
        if not isinstance(prefix, str) or not _VHOST_PREFIX.fullmatch(prefix):
            raise ConfigError(f"option 'vhost_prefix' must match [A-Za-z0-9_.-]{{0,64}}, got {prefix!r}")
        self._ssl = self._check_ssl("ssl", o["ssl"], _SSL_KEYS)
        fed_ssl = o["federation_ssl"]
        if fed_ssl is None:
            self._fed_ssl = None if self._ssl is None else {k: v for k, v in self._ssl.items() if k in _FED_SSL_KEYS}
        elif fed_ssl is False:
            self._fed_ssl = None
        else:
            self._fed_ssl = self._check_ssl("federation_ssl", fed_ssl, _FED_SSL_KEYS)
        if self.mode == "federated" and self._fed_ssl is not None and not self._fed_ssl.get("ca_file"):
            raise ConfigError("federation over TLS needs 'ca_file' (in 'federation_ssl' or 'ssl') for the broker")
        self._peer_credentials = self._check_peers(o["peer_credentials"])
        secret = o["secret"]
        self._secret = secret.encode() if isinstance(secret, str) else secret

        self.host: str = o["host"]
        self.port: int = o["port"]
        self.vhost = f"{prefix}{ctx.job_id}"
        self.user_name = self.party_user(ctx.party)
        self._exchange = self.exchange(ctx.party)
        self._password = _derive(str(o["password"]).encode(), "data-user", f"{self.vhost}\0{self.user_name}")
        self._prefetch: int = o["prefetch"]
        self._prefetch_max: int = max(o["prefetch_max"], self._prefetch)
        self._prefetch_bytes: int = o["prefetch_bytes"]
        # The qos of a lane only ever rises above `prefetch`, so the broker never stops short of this.
        self.max_unacked_per_lane = self._prefetch
        self._window: int = o["send_window"]
        self._window_bytes: int = o["send_window_bytes"]
        self._send_timeout = float(o["send_timeout"])
        self._connect_timeout = float(o["connect_timeout"])
        self._ttl_ms = int(o["ttl_seconds"]) * 1000

        self._lock = threading.Lock()  # registries shared by caller threads
        self._admin: RabbitAdmin | None = None
        self._admin_lock = threading.Lock()  # guards the lazily made management client
        self._setup_lock = threading.Lock()  # control-plane set-up per remote party, once
        self._upstreams: set[Party] = set()
        self._links: set[Party] = set()
        self._consumers: dict[tuple[Party, int], _Consumer] = {}
        self._op_ids = itertools.count(1)
        self._closed = False
        self._warned_admin_upstream = False

        # I/O thread state: touched only on that thread once it runs.
        self._loop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        self._io_ident: int | None = None
        self._conn: SelectConnection | None = None
        self._stopping = False
        self._connected_once = False
        self._first_refusals = 0
        self._first = threading.Event()  # first publisher channel ready, or first failure
        self._first_error: str | None = None
        self._problem = ""  # the last connection problem, for error messages
        self._backoff = _RETRY_FIRST
        self._outage_since: float | None = None
        self._reconnect_timer: Any = None
        self._epochs = itertools.count(1)
        self._pub: Channel | None = None
        self._pub_epoch = 0
        self._pub_ready = False
        self._pub_tag = 0
        self._pub_retry = _RETRY_FIRST
        self._outstanding: dict[int, tuple[_Send, int]] = {}  # delivery tag -> (send, index)
        self._declared: set[str] = set()  # queues declared and bound on the current publisher channel
        self._declaring: set[str] = set()  # queues whose declare-and-bind is under way on it
        self._ops: dict[int, _Send] = {}
        self._posted: list[Callable[[], None]] = []  # calls for the I/O thread, run by one wake-up
        self._posted_lock = threading.Lock()
        self._drain_scheduled = False

    # options -------------------------------------------------------------------------------

    def _check_int(self, key: str, lo: int, hi: int) -> None:
        value = self.ctx.options[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"option {key!r} must be an integer in [{lo}, {hi}], got {value!r}")

    @staticmethod
    def _check_ssl(key: str, value: Any, allowed: frozenset[str]) -> dict[str, str] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f"option {key!r} must be a mapping with keys {sorted(allowed)}, got {value!r}")
        unknown = set(value) - allowed
        if unknown:
            raise ConfigError(f"option {key!r} has unknown key(s) {sorted(unknown)}; known: {sorted(allowed)}")
        out = {k: str(v) for k, v in value.items() if v is not None}
        if "key_file" in out and "cert_file" not in out:
            raise ConfigError(f"option {key!r}: 'key_file' needs 'cert_file'")
        return out

    @staticmethod
    def _check_peers(value: Any) -> dict[str, tuple[str, str]]:
        if not isinstance(value, Mapping):
            raise ConfigError(f"option 'peer_credentials' must map party ids to {{user, password}}, got {value!r}")
        out: dict[str, tuple[str, str]] = {}
        for pid, cred in value.items():
            if not isinstance(cred, Mapping) or not {"user", "password"} <= set(cred):
                raise ConfigError(f"option 'peer_credentials' for party {pid!r} needs 'user' and 'password'")
            out[str(pid)] = (str(cred["user"]), str(cred["password"]))
        return out

    # naming --------------------------------------------------------------------------------

    def queue(self, src: Party, dst: Party, lane: int) -> str:
        return f"{self.ctx.job_id}:{src.role}:{src.party_id}:{dst.role}:{dst.party_id}:{lane + self.ctx.lane_offset}"

    def exchange(self, src: Party) -> str:
        """The exchange ``src`` publishes to: only its own queues are bound to it."""
        return f"{self.ctx.job_id}:{src.role}:{src.party_id}"

    def party_user(self, party: Party) -> str:
        return f"{self.vhost}:{party.role}:{party.party_id}"

    def link_user(self, src: Party, dst: Party) -> str:
        return f"{self.vhost}:link:{src.role}:{src.party_id}:{dst.role}:{dst.party_id}"

    @staticmethod
    def upstream_name(src: Party) -> str:
        return f"from:{src.role}:{src.party_id}"

    @staticmethod
    def policy_name(src: Party) -> str:
        return f"federate:{src.role}:{src.party_id}"

    def _queue_pattern(self, src: Party | None, dst: Party | None) -> str:
        """Regex of the queues from ``src`` to ``dst`` (``None``: any party), every lane."""

        def part(p: Party | None) -> str:
            return "[^:]+:[^:]+" if p is None else f"{re.escape(p.role)}:{re.escape(p.party_id)}"

        return f"^{re.escape(self.ctx.job_id)}:{part(src)}:{part(dst)}:[0-9]+$"

    def _data_permissions(self) -> tuple[str, str, str]:
        """(configure, write, read) of the party's data user.

        RabbitMQ checks a publish against the exchange, not the queue it reaches: with the
        default exchange writable, a party could publish into any queue of the job. So each
        party publishes to an exchange of its own, to which only its outgoing queues are
        bound, and may write nowhere else. Binding needs write on the queue and read on the
        exchange; writing to a queue allows nothing more than binding it."""
        me = self.ctx.party
        outgoing, incoming = self._queue_pattern(me, None), self._queue_pattern(None, me)
        exchange = f"^{re.escape(self.exchange(me))}$"
        configure = f"{outgoing}|{incoming}|{exchange}"  # declare own queues, both ways, and the exchange
        return configure, f"{exchange}|{outgoing}", f"{incoming}|{exchange}"

    # control plane -------------------------------------------------------------------------

    def admin(self) -> RabbitAdmin:
        """The management API client of this party's broker (admin credentials)."""
        with self._admin_lock:
            if self._admin is None:
                o = self.ctx.options
                host = f"[{self.host}]" if ":" in self.host else self.host
                self._admin = RabbitAdmin(f"http://{host}:{o['mng_port']}", o["user"], o["password"])
            return self._admin

    def _setup_vhost(self) -> None:
        a = self.admin()
        if self.mode == "federated":
            a.require_plugins("rabbitmq_federation")
        a.put_vhost(self.vhost, description=f"fedtransport job {self.ctx.job_id}")
        # The safety net for a scheduler that never calls cleanup: unused queues expire.
        a.put_policy(self.vhost, _EXPIRY_POLICY, ".*", {"expires": self._ttl_ms}, priority=0)
        self._put_user(self.user_name, self._password)
        a.set_permissions(self.vhost, self.user_name, *self._data_permissions())

    def _put_user(self, name: str, password: str) -> None:
        try:
            self.admin().put_user(name, password, tags="")
        except BackendError as exc:
            # Two processes of one party creating the same user at once: the loser gets a 400;
            # the user exists now, and a second PUT updates it.
            if exc.status != 400 or "already_exists" not in str(exc):
                raise
            self.admin().put_user(name, password, tags="")

    def _ensure_link_user(self, dst: Party) -> None:
        """Federated mode with a secret: the user ``dst``'s broker pulls our queues to it as."""
        if self.mode != "federated" or self._secret is None:
            return
        with self._setup_lock:  # the lanes' sends start together: one of them creates it
            if dst in self._links:
                return
            name = self.link_user(self.ctx.party, dst)
            pattern = self._queue_pattern(self.ctx.party, dst)
            self._put_user(name, _derive(self._secret, "federation-link", f"{self.vhost}\0{name}"))
            # The link declares the upstream queue (configure) and consumes it (read); nothing else.
            self.admin().set_permissions(self.vhost, name, pattern, "^$", pattern)
            self._links.add(dst)

    def _upstream_credentials(self, src: Party) -> tuple[str, str]:
        if self._secret is not None:
            name = self.link_user(src, self.ctx.party)
            return name, _derive(self._secret, "federation-link", f"{self.vhost}\0{name}")
        if src.party_id in self._peer_credentials:
            return self._peer_credentials[src.party_id]
        if not self._warned_admin_upstream:
            self._warned_admin_upstream = True
            log.warning(
                "job %s: no 'secret': federation upstreams authenticate with admin credentials "
                "(peer_credentials, else this party's own); set a job secret for least-privilege link users",
                self.ctx.job_id,
            )
        o = self.ctx.options
        return str(o["user"]), str(o["password"])

    def upstream_uri(self, src: Party) -> str:
        """The AMQP URI our broker pulls ``src``'s queues from (credentials included)."""
        rt = self.ctx.route_table
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
        hostpart = f"[{host}]" if ":" in host else host
        uri = (
            f"{'amqps' if tls is not None else 'amqp'}://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{hostpart}:{port}/{quote(self.vhost, safe='')}"
        )
        return f"{uri}?{urlencode(query)}" if query else uri

    def _ensure_upstream(self, src: Party) -> None:
        """Federated mode: one upstream and one policy per remote party, pulling its queues to us."""
        if self.mode != "federated":
            return
        with self._setup_lock:
            if src in self._upstreams:
                return
            a = self.admin()
            name = self.upstream_name(src)
            a.put_federation_upstream(
                self.vhost,
                name,
                self.upstream_uri(src),
                ack_mode="on-confirm",
                prefetch_count=int(self.ctx.options["federation_prefetch"]),
                reconnect_delay=_UPSTREAM_RECONNECT,
            )
            definition = {"federation-upstream": name, "expires": self._ttl_ms}  # one policy per queue wins
            a.put_policy(self.vhost, self.policy_name(src), self._queue_pattern(src, self.ctx.party), definition,
                         apply_to="queues", priority=1)  # fmt: skip
            self._upstreams.add(src)

    def _warn_about_links(self, src: Party) -> None:
        """The watchdog found no progress from ``src``: say why if its federation link is down."""
        try:
            links = self.admin().federation_links(self.vhost)
        except BackendError as exc:
            log.warning("cannot read the federation links of %s: %s", self.vhost, exc)
            return
        name = self.upstream_name(src)
        mine = [link for link in links if link.get("upstream") == name]
        bad = [link for link in mine if link.get("status") != "running"]
        if not mine or bad:
            detail = "; ".join(f"{x.get('queue')}: {x.get('status')} {x.get('error', '')}".strip() for x in bad)
            log.warning("federation from %s into %s is not running: %s", src, self.vhost, detail or "no link yet")

    # lifecycle -----------------------------------------------------------------------------

    def _ssl_options(self) -> pika.SSLOptions | None:
        if self._ssl is None:
            return None
        s = self._ssl
        try:
            context = ssl.create_default_context(cafile=s.get("ca_file"))
            if "cert_file" in s:
                context.load_cert_chain(s["cert_file"], s.get("key_file"))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"option 'ssl': cannot load the CA or client certificate: {exc}") from exc
        return pika.SSLOptions(context, server_hostname=s.get("server_hostname", self.host))

    def _parameters(self) -> pika.ConnectionParameters:
        o = self.ctx.options
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user_name, self._password),
            ssl_options=self._ssl_options(),
            heartbeat=int(o["heartbeat"]),
            blocked_connection_timeout=float(o["blocked_connection_timeout"]),
            connection_attempts=1,  # retries are ours, with back-off
            socket_timeout=self._connect_timeout,
            stack_timeout=self._connect_timeout,
            client_properties={"connection_name": f"fedtransport {self.ctx.job_id} {self.ctx.party}"},
        )

    def open(self) -> None:
        self._setup_vhost()
        params = self._parameters()
        self._loop = IOLoop()
        self._thread = threading.Thread(target=self._run, args=(params,), name=f"ft-rabbit-{self.ctx.party}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        if not self._first.wait(self._connect_timeout * 2 + 5) or self._first_error is not None:
            why = self._first_error or f"no answer in {self._connect_timeout:.0f} s"
            self.close()
            scheme = "amqps" if self._ssl is not None else "amqp"
            raise BackendError(
                f"RabbitMQ: cannot connect to {scheme}://{self.host}:{self.port}/{self.vhost} "
                f"as {self.user_name}: {why}",
                broker_message=why,
            )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None and thread.is_alive():
            with contextlib.suppress(Exception):  # the loop may have ended and closed meanwhile
                loop.add_callback_threadsafe(self._shutdown)
            thread.join(_CLOSE_WAIT)
            if thread.is_alive():
                log.warning("the RabbitMQ I/O thread of %s did not stop in %.0f s", self.ctx.party, _CLOSE_WAIT)
        for op in list(self._ops.values()):
            op.fail("the RabbitMQ transport was closed")
        for c in list(self._consumers.values()):
            c.stop()  # what it still holds is unacknowledged: the broker delivers it again

    def cleanup(self) -> None:
        # The vhost goes away with the connection's channels: close ours first.
        self.close()
        a = self.admin()
        users = {self.user_name} | {self.link_user(self.ctx.party, dst) for dst in self._links}
        users |= {p["user"] for p in self._listing(a.list_permissions) if p["user"].startswith(f"{self.vhost}:")}
        # A crash between creating a user and granting it permissions leaves one no vhost listing shows.
        users |= {u["name"] for u in a.list_users() if str(u.get("name", "")).startswith(f"{self.vhost}:")}
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

    # I/O thread ----------------------------------------------------------------------------

    def _run(self, params: pika.ConnectionParameters) -> None:
        assert self._loop is not None
        self._io_ident = threading.get_ident()
        self._params = params
        self._connect()
        while True:
            try:
                self._loop.start()
                break
            except Exception:  # a pika bug must not silently end the session's I/O
                log.exception("the RabbitMQ I/O loop failed")
                if self._stopping:
                    break
        try:
            self._loop.close()
        finally:
            self._first.set()

    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread (now, when already on it)."""
        if threading.get_ident() == self._io_ident:
            fn()
            return
        loop = self._loop
        if loop is None or self._closed:
            raise BackendError("the RabbitMQ transport is closed")
        # Calls queue up here and one wake-up of the loop runs all that arrived meanwhile: waking
        # pika's loop is a syscall under a lock, and with many transfers in flight it was the cost.
        with self._posted_lock:
            self._posted.append(fn)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            loop.add_callback_threadsafe(self._drain_posted)
        except Exception as exc:  # the loop was closed under us
            raise BackendError(f"the RabbitMQ transport is closed ({exc})") from None

    def _drain_posted(self) -> None:
        with self._posted_lock:
            calls, self._posted = self._posted, []
            self._drain_scheduled = False
        for fn in calls:
            try:
                fn()
            except Exception:  # as _safe: an exception must not end the I/O thread
                log.exception("RabbitMQ I/O call %s failed", fn)

    @_safe
    def _connect(self) -> None:
        self._reconnect_timer = None
        if self._stopping:
            return
        self._conn = SelectConnection(
            self._params,
            on_open_callback=_safe(self._on_open),
            on_open_error_callback=_safe(self._on_open_error),
            on_close_callback=_safe(self._on_closed),
            custom_ioloop=self._loop,
        )

    def _retry_connect(self, why: str) -> None:
        assert self._loop is not None
        if self._outage_since is None:  # one warning per outage, the attempts at INFO
            self._outage_since = time.monotonic()
            log.warning("RabbitMQ connection of %s: %s; reconnecting", self.ctx.party, why)
        self._problem = why
        delay = self._backoff
        self._backoff = min(self._backoff * 2, float(self.ctx.options["reconnect_max_delay"]))
        log.info("RabbitMQ connection of %s: %s; next attempt in %.1f s", self.ctx.party, why, delay)
        self._reconnect_timer = self._loop.call_later(delay, self._connect)

    def _on_open(self, conn: SelectConnection) -> None:
        if self._stopping:
            conn.close()
            return
        self._conn = conn
        conn.channel(on_open_callback=_safe(self._on_pub_channel))
        for c in list(self._consumers.values()):
            self._start_consumer(c)

    def _on_open_error(self, conn: SelectConnection, exc: BaseException) -> None:
        self._conn = None
        if self._stopping:
            self._loop_stop()
        elif (
            not self._connected_once
            and self._first_refusals < _FIRST_REFUSALS
            and isinstance(exc, (pika.exceptions.ProbableAccessDeniedError, pika.exceptions.ConnectionClosedByBroker))
        ):
            # A vhost or permission the management API has just created may not be in force on
            # the node yet (seen when two parties create a job's vhost at once): try again shortly.
            self._first_refusals += 1
            self._retry_connect(f"the broker refused the new job user: {_reason(exc)}")
        elif not self._connected_once:
            self._first_error = _reason(exc)  # open() reports it; nothing to retry for
            self._stopping = True
            self._loop_stop()
        else:
            self._retry_connect(f"reconnecting failed: {_reason(exc)}")

    def _on_closed(self, conn: SelectConnection, exc: BaseException) -> None:
        self._conn = None
        self._pub, self._pub_ready = None, False
        self._outstanding.clear()
        for c in self._consumers.values():
            c.channel = None
        if self._stopping:
            self._loop_stop()
        else:
            self._retry_connect(f"connection lost: {_reason(exc)}")

    def _loop_stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()

    @_safe
    def _shutdown(self) -> None:
        self._stopping = True
        if self._reconnect_timer is not None and self._loop is not None:
            self._loop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        for c in self._consumers.values():
            if c.timer is not None and self._loop is not None:
                self._loop.remove_timeout(c.timer)
                c.timer = None
        conn = self._conn
        if conn is not None and not (conn.is_closing or conn.is_closed):
            try:
                conn.close()  # flushes queued acks first; _on_closed stops the loop
                return
            except pika.exceptions.ConnectionWrongStateError:
                pass
        self._loop_stop()

    # publishing (I/O thread) ---------------------------------------------------------------

    def _on_pub_channel(self, ch: Channel) -> None:
        self._pub_epoch = epoch = next(self._epochs)
        self._pub, self._pub_ready, self._pub_tag = ch, False, 0
        self._outstanding.clear()
        self._declared.clear()
        self._declaring.clear()
        ch.add_on_close_callback(_safe(functools.partial(self._on_pub_closed, epoch)))
        ch.add_on_return_callback(_safe(self._on_return))
        ch.confirm_delivery(
            _safe(functools.partial(self._on_confirm, epoch)),
            callback=_safe(lambda _frame: self._on_pub_ready(epoch)),
        )

    def _on_pub_ready(self, epoch: int) -> None:
        if epoch != self._pub_epoch:
            return
        self._pub_ready = True
        self._backoff = self._pub_retry = _RETRY_FIRST
        self._connected_once = True
        self._problem = ""
        if self._outage_since is not None:
            down = time.monotonic() - self._outage_since
            self._outage_since = None
            log.warning("RabbitMQ connection of %s is back after %.1f s", self.ctx.party, down)
        self._first.set()
        for op in list(self._ops.values()):  # after a reconnect: publish again what is unconfirmed
            self._pump(op)

    def _on_pub_closed(self, epoch: int, ch: Channel, exc: BaseException) -> None:
        if epoch != self._pub_epoch:
            return
        lost = {op.id: op for op, _ in self._outstanding.values()}
        lost.update({op.id: op for op in self._ops.values() if op.queue in self._declaring})
        self._pub, self._pub_ready = None, False
        self._outstanding.clear()
        self._declaring.clear()
        conn = self._conn
        if self._stopping or conn is None or not conn.is_open:
            return  # the connection went: _on_closed reconnects and everything is published again
        # A channel error (access refused, message too large, ...): the sends it hit fail.
        why = _reason(exc)
        for op in lost.values():
            op.fail(f"the broker closed the publishing channel: {why}")
        delay, self._pub_retry = self._pub_retry, min(self._pub_retry * 2, 5.0)
        assert self._loop is not None
        self._loop.call_later(delay, _safe(self._reopen_pub))

    def _reopen_pub(self) -> None:
        conn = self._conn
        if not self._stopping and conn is not None and conn.is_open and self._pub is None:
            conn.channel(on_open_callback=_safe(self._on_pub_channel))

    def _register(self, op: _Send) -> None:
        self._ops[op.id] = op

    def _forget(self, op: _Send) -> None:
        self._ops.pop(op.id, None)

    def _pump(self, op: _Send) -> None:
        """Publish whatever of ``op`` has not gone out on the current channel."""
        ch = self._pub
        if not self._pub_ready or ch is None or op.id not in self._ops or op.error is not None:
            return
        if op.queue not in self._declared:
            self._declare_route(ch, op.queue)
            return
        with op.cond:
            todo = [(i, body) for i, body in op.unconfirmed.items() if op.sent_on.get(i) != self._pub_epoch]
        for i, body in todo:
            self._pub_tag += 1
            self._outstanding[self._pub_tag] = (op, i)
            op.sent_on[i] = self._pub_epoch
            props = BasicProperties(delivery_mode=2, message_id=f"{op.id}:{i}")
            ch.basic_publish(self._exchange, op.queue, body, props, mandatory=True)

    def _declare_route(self, ch: Channel, queue: str) -> None:
        """Declare our exchange and ``queue`` and bind them; then publish what waits for it.

        pika holds an RPC back until the one before it is answered, but not a publish, which
        could then overtake the declaration it needs: nothing goes out before the bind is
        confirmed (the RPCs are answered in order, so the last one's reply is enough)."""
        if queue in self._declaring:
            return  # under way: its end pumps every send to this queue
        self._declaring.add(queue)
        epoch = self._pub_epoch

        def bound(_frame: Any) -> None:
            if epoch != self._pub_epoch:
                return
            self._declaring.discard(queue)
            self._declared.add(queue)
            for op in [o for o in self._ops.values() if o.queue == queue]:
                self._pump(op)

        ch.exchange_declare(self._exchange, "direct", durable=True)
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, self._exchange, routing_key=queue, callback=_safe(bound))

    def _on_confirm(self, epoch: int, frame: Any) -> None:
        if epoch != self._pub_epoch:
            return
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        done: list[tuple[_Send, int]] = []
        if method.multiple:
            while self._outstanding:
                first = next(iter(self._outstanding))  # tags are inserted in increasing order
                if first > tag:
                    break
                done.append(self._outstanding.pop(first))
        elif tag in self._outstanding:
            done.append(self._outstanding.pop(tag))
        now = time.monotonic()
        for op, i in done:
            op.sent_on.pop(i, None)
            with op.cond:
                op.unconfirmed.pop(i, None)
                op.progress = now
                if not ok and op.error is None:
                    op.error = f"the broker refused (nacked) message {i} for queue {op.queue}"
                op.cond.notify_all()

    def _on_return(self, ch: Channel, method: Any, props: BasicProperties, body: bytes) -> None:
        op_id, _, index = (props.message_id or "").partition(":")
        op = self._ops.get(int(op_id)) if op_id.isdigit() else None
        if op is not None:
            op.fail(f"the broker returned message {index} for queue {method.routing_key}: "
                    f"{method.reply_code} {method.reply_text}")  # fmt: skip

    # consuming (I/O thread) ----------------------------------------------------------------

    def _start_consumer(self, c: _Consumer) -> None:
        c.timer = None
        conn = self._conn
        if self._stopping or conn is None or not conn.is_open or c.channel is not None:
            return
        conn.channel(on_open_callback=_safe(functools.partial(self._on_consumer_channel, c)))

    def _on_consumer_channel(self, c: _Consumer, ch: Channel) -> None:
        if self._stopping or c.channel is not None:
            ch.close()
            return
        c.channel, c.epoch, c.recovering = ch, next(self._epochs), False
        c.qos, c.mean_size = self._prefetch, float(self.ctx.max_message_size)
        c.held = 0  # what the old channel delivered unacknowledged is requeued
        ch.add_on_close_callback(_safe(functools.partial(self._on_consumer_closed, c)))
        # The queue was deleted under us (or similar): start over on a fresh channel.
        ch.add_on_cancel_callback(_safe(lambda _frame: ch.close() if ch.is_open else None))
        # pika sends these RPCs one after another, in this order
        ch.basic_qos(prefetch_count=self._qos_of(c), global_qos=True)
        ch.queue_declare(c.queue, durable=True)
        ch.basic_consume(c.queue, _safe(functools.partial(self._on_message, c)), auto_ack=False,
                         callback=_safe(lambda _frame: self._on_consuming(c, ch)))  # fmt: skip

    def _on_consuming(self, c: _Consumer, ch: Channel) -> None:
        if ch is c.channel:
            c.retry = _RETRY_FIRST
            c.error = None
            c.ready.set()

    def _on_message(self, c: _Consumer, ch: Channel, method: Any, props: BasicProperties, body: bytes) -> None:
        if ch is not c.channel:
            return  # a straggler from a channel we gave up
        # Deliveries made before a basic.recover took effect were requeued: their tags are void.
        epoch = -1 if c.recovering else c.epoch
        c.handoff.put(Delivery(c.src, c.lane, body, (epoch, method.delivery_tag)))
        self._adapt_qos(c, ch, len(body))

    def _adapt_qos(self, c: _Consumer, ch: Channel, size: int) -> None:
        """Keep about ``prefetch_bytes`` in flight per lane: a few big messages or many small ones.

        RabbitMQ counts prefetch in messages only. Starting from ``prefetch`` (sized for full
        messages), the count rises as small messages keep coming, which is what lets many small
        transfers stream; one big message brings it straight back down.
        """
        c.mean_size = 0.9 * c.mean_size + 0.1 * size if size < c.mean_size else float(size)
        want = max(self._prefetch, min(self._prefetch_max, int(self._prefetch_bytes // max(c.mean_size, 1.0))))
        bound = want in (self._prefetch, self._prefetch_max)
        if want != c.qos and (bound or want >= 2 * c.qos or 2 * want <= c.qos):  # hysteresis: no qos chatter
            c.qos = want
            ch.basic_qos(prefetch_count=self._qos_of(c), global_qos=True)

    @staticmethod
    def _qos_of(c: _Consumer) -> int:
        # Set as the channel's limit (global): RabbitMQ fixes a per-consumer limit when the consumer
        # starts, while the channel's limit can be changed under a running consumer. One consumer
        # per channel, so the two mean the same.
        return min(65535, c.qos + c.held)

    def _do_make_room(self, c: _Consumer, held: int) -> None:
        ch = c.channel
        if ch is None or not ch.is_open or held <= c.held:
            return
        c.held = held
        ch.basic_qos(prefetch_count=self._qos_of(c), global_qos=True)

    def _on_consumer_closed(self, c: _Consumer, ch: Channel, exc: BaseException) -> None:
        if ch is not c.channel:
            return
        c.channel = None
        conn = self._conn
        if self._stopping or conn is None or not conn.is_open:
            return  # the connection went: _on_open starts every consumer again
        why = _reason(exc)
        if not c.ready.is_set():
            c.error = why
            c.ready.set()  # listen() reports the first failure
        log.warning("consuming %s stopped: %s; again in %.1f s", c.queue, why, c.retry)
        assert self._loop is not None
        c.timer = self._loop.call_later(c.retry, _safe(functools.partial(self._start_consumer, c)))
        c.retry = min(c.retry * 2, 5.0)

    def _do_acks(self, tokens: list[tuple[int, Party, Any]]) -> None:
        for lane, src, (epoch, tag) in tokens:
            c = self._consumers.get((src, lane))
            if c is None or c.channel is None or not c.channel.is_open:
                continue
            if epoch == c.epoch and not c.recovering:  # else: requeued already, comes again
                c.channel.basic_ack(tag)

    def _do_recover(self, c: _Consumer) -> None:
        ch = c.channel
        if ch is None or not ch.is_open or c.recovering:
            if ch is None and c.timer is None:
                self._start_consumer(c)
            return
        c.recovering = True

        def recovered(_frame: Any) -> None:
            if ch is c.channel:
                c.epoch, c.recovering = next(self._epochs), False

        ch.basic_recover(requeue=True, callback=_safe(recovered))

    # data plane (caller threads) -----------------------------------------------------------

    def send(self, dst: Party, lane: int, messages: Iterable[bytes]) -> int:
        if self._closed:
            raise BackendError("the RabbitMQ transport is closed")
        self._ensure_link_user(dst)
        op = _Send(next(self._op_ids), self.queue(self.ctx.party, dst, lane))
        limit = self.ctx.max_message_size
        self._post(functools.partial(self._register, op))
        count = 0
        try:
            for msg in messages:
                body = msg if isinstance(msg, bytes) else bytes(msg)
                if len(body) > limit:
                    raise BackendError(f"message of {len(body)} bytes exceeds max_message_size {limit}")
                with op.cond:
                    self._wait(op, functools.partial(self._room, op, len(body)))
                    if not op.unconfirmed:  # the confirm clock runs while something is outstanding
                        op.progress = time.monotonic()
                    op.unconfirmed[count] = body
                count += 1
                self._post(functools.partial(self._pump, op))
            with op.cond:
                self._wait(op, lambda: not op.unconfirmed)
        finally:
            with contextlib.suppress(BackendError):  # closed: nothing left to forget it in
                self._post(functools.partial(self._forget, op))
        return count

    def _room(self, op: _Send, size: int) -> bool:
        """The window: ``send_window`` messages and ``send_window_bytes`` unconfirmed at most."""
        if not op.unconfirmed:
            return True
        held = sum(len(b) for b in op.unconfirmed.values())
        return len(op.unconfirmed) < self._window and held + size <= self._window_bytes

    def _wait(self, op: _Send, done: Callable[[], bool]) -> None:
        """Block (holding ``op.cond``) until ``done()``; raise on failure or no progress."""
        while True:
            if op.error is not None:
                raise BackendError(f"RabbitMQ: sending to {op.queue} failed: {op.error}", broker_message=op.error)
            if done():
                return
            if self._closed:
                raise BackendError("the RabbitMQ transport is closed")
            left = op.progress + self._send_timeout - time.monotonic()
            if left <= 0:
                why = self._problem or "the broker is slow or blocked (resource alarm?)"
                raise BackendError(
                    f"RabbitMQ: no publisher confirm for {op.queue} in {self._send_timeout:.0f} s "
                    f"({len(op.unconfirmed)} messages unconfirmed): {why}",
                    broker_message=why,
                )
            op.cond.wait(left)

    def listen(self, src: Party, lane: int, deliver: DeliverFn) -> None:
        key = (src, lane)
        with self._lock:
            if key in self._consumers:
                return
            c = _Consumer(src, lane, self.queue(src, self.ctx.party, lane), deliver)
            self._consumers[key] = c
        self._ensure_upstream(src)
        self._post(functools.partial(self._start_consumer, c))
        if self._conn is not None and self._pub_ready:  # connected: report a refusal now
            c.ready.wait(self._connect_timeout)
            if c.error is not None:
                raise BackendError(f"RabbitMQ: consuming {c.queue} failed: {c.error}", broker_message=c.error)

    def ack(self, deliveries: Sequence[tuple[int, Party, Any]]) -> None:
        if self._closed or not deliveries:
            return  # what was not acknowledged is delivered again and dropped as a duplicate
        self._post(functools.partial(self._do_acks, list(deliveries)))

    def make_room(self, src: Party, lane: int, held: int) -> None:
        c = self._consumers.get((src, lane))
        if c is not None and not self._closed:
            self._post(functools.partial(self._do_make_room, c, held))

    def redeliver(self, src: Party, lane: int) -> None:
        if self.mode == "federated" and lane == 0:
            try:
                self._ensure_upstream(src)  # in case listen() could not create it
            except BackendError as exc:
                log.warning("federation from %s cannot be set up: %s", src, exc)
            self._warn_about_links(src)
        c = self._consumers.get((src, lane))
        if c is not None and not self._closed:
            self._post(functools.partial(self._do_recover, c))

    def describe(self) -> str:
        scheme = "amqps" if self._ssl is not None else "amqp"
        return f"rabbitmq {self.mode} via {scheme}://{self.host}:{self.port}/{self.vhost} as {self.user_name}"
