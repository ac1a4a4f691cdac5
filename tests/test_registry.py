"""The backend registry: built-in backends, third-party ones, and a missing broker client."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import fedtransport as ft
from fedtransport.transport import Transport, available, get_backend, register


def test_builtin_backends_are_available_and_load():
    assert {"memory", "pulsar", "rabbitmq"} <= set(available())
    for name in ("memory", "pulsar", "rabbitmq"):
        assert issubclass(get_backend(name), Transport)


def test_an_unknown_backend_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ft.ConfigError, match=r"unknown backend 'kafka'.*memory.*pulsar.*rabbitmq"):
        get_backend("kafka")


def test_register_refuses_what_is_not_a_transport_and_accepts_a_subclass():
    with pytest.raises(ft.ConfigError, match="must be a Transport subclass"):
        register("bogus", object)  # type: ignore[arg-type]
    memory = get_backend("memory")
    register("memory-alias-for-test", memory)
    assert get_backend("memory-alias-for-test") is memory
    assert "memory-alias-for-test" in available()


def test_a_missing_broker_client_names_the_package_to_install():
    """pika not importable: rabbitmq is not offered, and asking for it says what to install
    instead of a ModuleNotFoundError from deep inside the import."""
    code = textwrap.dedent(
        """
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "pika" else real(name, *a)
        import fedtransport as ft
        from fedtransport.transport import available, get_backend
        assert "rabbitmq" not in available() and "pulsar" in available(), available()
        try:
            get_backend("rabbitmq")
        except ft.ConfigError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the rabbitmq backend needs its broker client: pip install pika"
