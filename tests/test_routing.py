"""Route tables: FATE's Pulsar and RabbitMQ formats, the SNI star, errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedtransport as ft
from fedtransport.routing import bare_host, host_problem, url_host

TABLES = Path(__file__).resolve().parent.parent / "route_tables"


def test_point_to_point_table():
    rt = ft.RouteTable.load(TABLES / "pulsar_route_table.yaml")
    ep = rt.resolve(9999)
    assert (ep.host, ep.port, ep.ssl_port, ep.proxy) == ("192.168.0.4", 6650, 6651, None)
    assert rt.resolve("10000") == rt.resolve(ft.Party("host", 10000))
    cluster = rt.pulsar_cluster(10000)
    assert cluster["brokerServiceUrl"] == "pulsar://192.168.0.3:6650"
    assert cluster["brokerServiceUrlTls"] == "pulsar+ssl://192.168.0.3:6651"
    assert cluster["proxyServiceUrl"] == "" and cluster["proxyProtocol"] is None


def test_star_table_matches_the_reference_deployment():
    # ../shared/reference/fate-on-spark-with-pulsar.txt: the cluster used to sync with party 9999
    rt = ft.RouteTable.load(TABLES / "pulsar_star_route_table.yaml")
    assert rt.pulsar_cluster("9999") == {
        "serviceUrl": "",
        "serviceUrlTls": "",
        "brokerServiceUrl": "pulsar://9999.fate.org:6650",
        "brokerServiceUrlTls": "pulsar+ssl://9999.fate.org:6651",
        "proxyServiceUrl": "pulsar+ssl://proxy.fate.org:443",
        "proxyProtocol": "SNI",
        "peerClusterNames": [],
    }
    ep = rt.resolve(8888)
    assert (ep.host, ep.sni, ep.proxy_host, ep.proxy_port, ep.listed) == (
        "8888.fate.org", "8888.fate.org", "proxy.fate.org", 443, False,
    )  # fmt: skip
    own = rt.resolve(10000)
    assert own.listed and own.proxy is None and own.sni == "10000.fate.org"  # an IP host: SNI from the domain


def test_star_table_without_ports_uses_pulsar_defaults():
    rt = ft.RouteTable.load({10000: {"host": "10.0.0.1", "port": 6650}, "default": {"proxy": "p.x:443", "domain": "x"}})
    assert rt.pulsar_cluster(9999)["brokerServiceUrlTls"] == "pulsar+ssl://9999.x:6651"


def test_rabbitmq_table():
    rt = ft.RouteTable.load(TABLES / "rabbitmq_route_table.yaml")
    assert rt.kind == "rabbitmq"
    a, b = rt.resolve(9999), rt.resolve(10000)
    assert (a.host, a.port, a.mng_port, a.ssl_port) == ("192.168.0.4", 5672, 15672, None)
    assert (b.port, b.ssl_port) == (5672, 5671)
    with pytest.raises(ft.RouteError, match="8888"):
        rt.resolve(8888)


def test_mapping_and_routetable_sources():
    rt = ft.RouteTable.load({"9999": {"host": "h", "port": "6650"}})
    assert ft.RouteTable.load(rt) is rt
    assert rt.resolve(9999).port == 6650


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("9999: {host: h, port: abc}\n", "9999.port"),
        ("9999: {host: h, port: 70000}\n", "9999.port"),
        ("9999: {port: 6650}\n", "9999.host"),
        ("9999: {host: h, proxy: nocolon}\n", "9999.proxy"),
        ("9999: [1, 2]\n", "9999"),
        ("default: 5\n", "default"),
        # route check said OK to hosts no resolver takes: found only when a party connected
        ('9999: {host: "evil\\nhost"}\n', "9999.host"),
        ('9999: {host: "a b"}\n', "9999.host"),
        ("9999: {host: user@h}\n", "9999.host"),
        ("9999: {host: h/x}\n", "9999.host"),
        ("9999: {host: a..b}\n", "9999.host"),
        ('default: {domain: "fate .org"}\n', "default.domain"),
        ('9999: {host: h, proxy: "a b:443"}\n', "9999.proxy"),
    ],
)
def test_malformed_tables_name_file_and_key(tmp_path, text, key):
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ft.RouteError) as err:
        ft.RouteTable.load(path)
    assert str(path) in str(err.value) and repr(key) in str(err.value)


def test_hosts_may_be_any_dns_name_or_ip_literal():
    hosts = ["h", "localhost", "my_host.internal.", "party-a.fate.test", "10.0.0.1", "::1", "[fe80::1]"]
    rt = ft.RouteTable.load({str(9000 + i): {"host": h, "proxy": f"{h}:443"} for i, h in enumerate(hosts)})
    bare = [*hosts[:-1], "fe80::1"]  # one spelling of an IPv6 host: without the brackets a URL needs
    assert [rt.resolve(9000 + i).host for i in range(len(hosts))] == bare
    assert [rt.resolve(9000 + i).proxy_host for i in range(len(hosts))] == bare
    proxies = [rt.resolve(9000 + i).proxy for i in range(len(hosts))]
    assert proxies[-3:] == ["10.0.0.1:443", "[::1]:443", "[fe80::1]:443"]


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_is_bracketed_in_every_url_and_bare_elsewhere(host):
    from fedtransport.transport.pulsar.doctor import PulsarOperatorHooks
    from fedtransport.transport.rabbitmq.doctor import RabbitOperatorHooks

    rt = ft.RouteTable.load({"9999": {"host": host, "port": 6650, "mngPort": 8080, "proxy": f"{host}:443"}})
    ep = rt.resolve(9999)
    assert (ep.host, ep.sni, ep.proxy, ep.proxy_host, ep.proxy_port) == ("::1", "::1", "[::1]:443", "::1", 443)
    assert rt.pulsar_cluster(9999)["brokerServiceUrl"] == "pulsar://[::1]:6650"
    assert rt.pulsar_cluster(9999)["serviceUrl"] == "http://[::1]:8080"
    assert rt.pulsar_cluster(9999)["proxyServiceUrl"] == "pulsar+ssl://[::1]:443"
    pulsar = PulsarOperatorHooks.options_from_route({}, ep)
    assert (pulsar["service_url"], pulsar["admin_url"]) == ("pulsar://[::1]:6650", "http://[::1]:8080")
    assert RabbitOperatorHooks.options_from_route({}, ep)["host"] == "::1"  # pika takes the bare address
    assert url_host("::1") == url_host("[::1]") == "[::1]" and url_host("10.0.0.1") == "10.0.0.1"
    assert bare_host("[::1]") == bare_host("::1") == "::1" and bare_host("[h]") == "[h]"
    assert host_problem("[::1") is not None and host_problem("[h]") is not None


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("9999: {host: [unclosed\n")
    with pytest.raises(ft.RouteError, match="not valid YAML"):
        ft.RouteTable.load(path)
    with pytest.raises(ft.RouteError, match="cannot read"):
        ft.RouteTable.load(tmp_path / "absent.yaml")
    path.write_text("- just a list\n")
    with pytest.raises(ft.RouteError, match="top level"):
        ft.RouteTable.load(path)


def test_unlisted_party_without_default():
    rt = ft.RouteTable.load({9999: {"host": "h", "port": 1}})
    with pytest.raises(ft.RouteError, match="not listed"):
        rt.resolve(10000)
