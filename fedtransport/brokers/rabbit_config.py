"""What a throw-away RabbitMQ node is told: its config file, its plugins and its environment.

:class:`~fedtransport.brokers.rabbitmq.RabbitNode` owns the processes; this module holds what it
writes for them. Every listener goes to 127.0.0.1 on the node's own ports: AMQP, management,
AMQPS with ``tls``, and the plugins that would otherwise take a fixed well-known port
(:data:`PLUGIN_PORTS`). Without extra ``rabbitmq.conf`` keys the same settings go into the
classic Erlang-term ``rabbitmq.config``, which skips cuttlefish schema translation (~7 s of
boot here). :func:`node_environment` points the node, its epmd and the CLI tools at the node's
files and ports, and marks each process with :data:`MARKER` so that all of them can be found.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._process import LOOPBACK

if TYPE_CHECKING:
    from .rabbitmq import RabbitNode

__all__ = [
    "MARKER",
    "PLUGIN_PORTS",
    "TLS_KEYS",
    "check_tls",
    "classic_config_text",
    "config_file_name",
    "config_text",
    "node_environment",
    "plugin_list",
]

#: The environment variable that marks every process of a node (its value: the node's directory name).
MARKER = "FEDTRANSPORT_RABBIT_NODE"
TLS_KEYS = {"certfile", "keyfile", "cacertfile", "ssl_port", "require_peer_cert"}

# Plugins that would otherwise bind a fixed, well-known port: how to move them to a free one.
# plugin: (rabbitmq.conf port key, conf value is "ip:port", conf ip key or "", classic-format style)
# where the classic style is "listeners" ({tcp_listeners, [{IP, Port}]}) or "tcp_config".
PLUGIN_PORTS: dict[str, tuple[str, bool, str, str]] = {
    "rabbitmq_prometheus": ("prometheus.tcp.port", False, "prometheus.tcp.ip", "tcp_config"),
    "rabbitmq_stream": ("stream.listeners.tcp.1", True, "", "listeners"),
    "rabbitmq_mqtt": ("mqtt.listeners.tcp.default", True, "", "listeners"),
    "rabbitmq_stomp": ("stomp.listeners.tcp.1", True, "", "listeners"),
    "rabbitmq_web_stomp": ("web_stomp.tcp.port", False, "web_stomp.tcp.ip", "tcp_config"),
    "rabbitmq_web_mqtt": ("web_mqtt.tcp.port", False, "web_mqtt.tcp.ip", "tcp_config"),
}


def erl_str(text: str) -> str:
    """An Erlang string literal (a list of characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def erl_bin(text: str) -> str:
    """An Erlang binary literal (UTF-8), as RabbitMQ takes user names and passwords."""
    return f"<<{erl_str(text)}/utf8>>"


def plugin_list(plugins: Iterable[str]) -> tuple[str, ...]:
    """The plugins to enable, checked, in order, once each; federation brings its management pages."""
    if isinstance(plugins, str):
        plugins = [plugins]
    names: list[str] = []
    for p in plugins:
        if not re.fullmatch(r"[a-z0-9_]+", p):
            raise ConfigError(f"RabbitMQ plugin name {p!r} is not valid")
        if p not in names:
            names.append(p)
    if "rabbitmq_federation" in names and "rabbitmq_federation_management" not in names:
        # Shows federation links in the management API (GET /api/federation-links).
        names.append("rabbitmq_federation_management")
        if "rabbitmq_management" not in names:
            names.append("rabbitmq_management")
    return tuple(names)


def check_tls(tls: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """RabbitNode's ``tls`` mapping with absolute file paths; unknown keys and missing files refused."""
    if tls is None:
        return None
    unknown = set(tls) - TLS_KEYS
    if unknown:
        raise ConfigError(f"unknown RabbitNode tls key(s) {sorted(unknown)}; known: {sorted(TLS_KEYS)}")
    out: dict[str, Any] = dict(tls)
    for key in ("certfile", "keyfile", "cacertfile"):
        if not out.get(key):
            raise ConfigError(f"RabbitNode tls needs {key!r}")
        path = Path(out[key]).resolve()
        if not path.is_file():
            raise ConfigError(f"RabbitNode tls {key} {str(path)!r} does not exist")
        out[key] = str(path)
    out["require_peer_cert"] = bool(out.get("require_peer_cert", False))
    return out


def config_file_name(config: Mapping[str, str]) -> str:
    """``rabbitmq.conf`` with extra conf keys, else the classic ``rabbitmq.config``."""
    # rabbitmq.conf goes through cuttlefish schema translation, which costs ~7 s of boot
    # here; the classic Erlang-term file does not, so it is used unless conf keys are given.
    return "rabbitmq.conf" if config else "rabbitmq.config"


def config_text(node: RabbitNode) -> str:
    """``rabbitmq.conf``: listeners on loopback, the administrator, TLS, plugin ports, extra keys."""
    lines = {
        "listeners.tcp.1": f"{LOOPBACK}:{node.port}",
        "loopback_users": "none",
        "default_user": node.user,
        "default_pass": node.password,
    }
    if node.mng_port is not None:
        lines["management.tcp.ip"] = LOOPBACK
        lines["management.tcp.port"] = str(node.mng_port)
    if node.tls is not None:
        require = node.tls["require_peer_cert"]
        lines.update(
            {
                "listeners.ssl.1": f"{LOOPBACK}:{node.ssl_port}",
                "ssl_options.cacertfile": node.tls["cacertfile"],
                "ssl_options.certfile": node.tls["certfile"],
                "ssl_options.keyfile": node.tls["keyfile"],
                "ssl_options.verify": "verify_peer" if require else "verify_none",
                "ssl_options.fail_if_no_peer_cert": "true" if require else "false",
            }
        )
    for plugin, port in node.plugin_ports.items():
        key, with_ip, ip_key, _ = PLUGIN_PORTS[plugin]
        lines[key] = f"{LOOPBACK}:{port}" if with_ip else str(port)
        if ip_key:
            lines[ip_key] = LOOPBACK
    lines.update(node.config)
    return "".join(f"{k} = {v}\n" for k, v in lines.items())


def classic_config_text(node: RabbitNode) -> str:
    """The same settings in the classic Erlang-term format, which skips cuttlefish."""
    ip = erl_str(LOOPBACK)
    rabbit = [
        f"{{tcp_listeners, [{{{ip}, {node.port}}}]}}",
        "{loopback_users, []}",
        f"{{default_user, {erl_bin(node.user)}}}",
        f"{{default_pass, {erl_bin(node.password)}}}",
    ]
    if node.tls is not None:
        require = node.tls["require_peer_cert"]
        options = ", ".join(
            [
                *(f"{{{k}, {erl_str(node.tls[k])}}}" for k in ("cacertfile", "certfile", "keyfile")),
                f"{{verify, {'verify_peer' if require else 'verify_none'}}}",
                f"{{fail_if_no_peer_cert, {'true' if require else 'false'}}}",
            ]
        )
        rabbit.append(f"{{ssl_listeners, [{{{ip}, {node.ssl_port}}}]}}")
        rabbit.append(f"{{ssl_options, [{options}]}}")
    apps = [f"{{rabbit, [{', '.join(rabbit)}]}}"]
    if node.mng_port is not None:
        mng = f"[{{ip, {ip}}}, {{port, {node.mng_port}}}]"
        apps.append(f"{{rabbitmq_management, [{{tcp_config, {mng}}}]}}")
    for plugin, port in node.plugin_ports.items():
        if PLUGIN_PORTS[plugin][3] == "listeners":
            apps.append(f"{{{plugin}, [{{tcp_listeners, [{{{ip}, {port}}}]}}]}}")
        else:
            apps.append(f"{{{plugin}, [{{tcp_config, [{{ip, {ip}}}, {{port, {port}}}]}}]}}")
    return "[\n " + ",\n ".join(apps) + "\n].\n"


def node_environment(node: RabbitNode, tmp: Path, cookie_home: Path) -> dict[str, str]:
    """The environment of every process of ``node`` (files in ``tmp``), and of the CLI tools aimed at it."""
    # Inherited RABBITMQ_*/ERL_* settings would point the node at someone else's files.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    dist_args = "-kernel inet_dist_use_interface {127,0,0,1}"
    env.update(
        {
            "HOME": str(cookie_home),
            MARKER: tmp.name,
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "ERL_EPMD_PORT": str(node.epmd_port),
            "ERL_CRASH_DUMP": str(tmp / "log" / "erl_crash.dump"),
            "RABBITMQ_NODENAME": node.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
            "RABBITMQ_LOG_BASE": str(tmp / "log"),
            "RABBITMQ_LOGS": str(tmp / "log" / "rabbit.log"),
            "RABBITMQ_CONFIG_FILE": str(tmp / config_file_name(node.config)),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(tmp / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(tmp / "rabbit.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(tmp / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": dist_args,
            "RABBITMQ_CTL_ERL_ARGS": dist_args,
        }
    )
    return env
