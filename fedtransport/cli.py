"""The ``fedtransport`` command: demo, route, certs, keys, cleanup, doctor and bench.

Every subcommand has ``--help`` with examples; docs/cli.md has the long form. Exit codes:
0 success, 1 a check failed or the broker/route table/option was refused (the message says
why), 2 bad command-line usage. Run in-process with ``main([...])``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .cli_route import route_command
from .errors import ConfigError, FederationError
from .transport import available

__all__ = ["load_options", "main", "parse_option"]

EXAMPLES = """\
examples:
  fedtransport demo                      two parties, two processes, an embedded Pulsar broker
  fedtransport demo --backend rabbitmq   on a throw-away local RabbitMQ node
  fedtransport route show route_tables/pulsar_star_route_table.yaml --party 9999
  fedtransport certs --domain fate.org --party 9999 --party 10000 --out ./certs
  fedtransport keys new --out ./identity.pem --party 9999
  fedtransport doctor --backend rabbitmq --option host=10.0.0.5 --option password=secret
  fedtransport cleanup --backend pulsar --job job-42 --option admin_url=http://10.0.0.4:8080
  fedtransport bench --backend pulsar --json results.json --chart results.png

each subcommand has its own --help with more examples
"""

DEMO_EXAMPLES = """\
examples:
  fedtransport demo                      two parties, two processes, an embedded Pulsar broker
  fedtransport demo --backend memory     the same in one process, no broker
  fedtransport demo --backend rabbitmq   on a throw-away local RabbitMQ node
"""

ROUTE_EXAMPLES = """\
examples:
  fedtransport route show route_tables/pulsar_route_table.yaml
  fedtransport route show route_tables/pulsar_star_route_table.yaml --party 8888
      (a party not listed: reached as 8888.fate.org through the SNI proxy)
  fedtransport route show route_tables/rabbitmq_route_table.yaml --json
  fedtransport route check route_tables/pulsar_route_table.yaml && echo usable
"""

KEYS_EXAMPLES = """\
examples:
  fedtransport keys new --out /etc/fedtransport/identity.pem --party 9999
      writes this party's X25519 private key (0600) and prints its route table line
  fedtransport keys public /etc/fedtransport/identity.pem --party 9999
      prints the route table line of an existing key

Give the key file as the option identity=PATH on this party; add the printed
public_key to this party's entry in every party's route table (or peer_keys).
See docs/security.md#pair-keys-identity.
"""

CERTS_EXAMPLES = """\
examples:
  fedtransport certs --domain fate.org --party 9999 --party 10000 --proxy proxy --out ./certs
  fedtransport certs --domain fate.org --party 8888 --out ./certs
      (adds party 8888 under the CA already in ./certs)
  fedtransport certs --domain fate.org --party 9999 --san 9999=192.168.0.4 --san proxy=203.0.113.7 --out ./certs

files (h = PARTY.DOMAIN, p = PROXY.DOMAIN; keys are written 0600):
  ca.cert.pem ca.key.pem          the CA: tlsTrustCertsFilePath / ca_file for every party
  h/broker.cert.pem               the broker's certificate (tlsCertificateFilePath)
  h/broker.key-pk8.pem            its PKCS#8 key (tlsKeyFilePath)
  h/broker.pem                    certificate + key in one file (haproxy crt)
  p/proxy.cert.pem p/proxy.key.pem p/proxy.pem   the same for the SNI proxy
"""

OPTION_HELP = """\
connection options (the backend's option keys, as in Federation.connect(options=...)):
  --option KEY=VALUE     repeatable; VALUE is parsed as JSON when it parses (5672, true,
                         {"ca_file": "ca.pem"}), else taken as a string
  --options FILE.yaml    a YAML/JSON mapping of options; a section named after the backend
                         (pulsar: {...}) is used when present; --option wins over the file
  --route-table FILE --party ID
                         fill host/port/management port (admin_url for Pulsar) from the
                         party's route table entry; explicit options win
"""

CLEANUP_EXAMPLES = (
    """\
examples:
  fedtransport cleanup --backend rabbitmq --job job-42 --option host=10.0.0.5 \\
      --option user=admin --option password=secret
  fedtransport cleanup --backend pulsar --job job-42 --option admin_url=http://10.0.0.4:8080 \\
      --option token=file:///etc/pulsar/admin.jwt
  fedtransport cleanup --backend rabbitmq --job job-42 --route-table route_tables/rabbitmq_route_table.yaml \\
      --party 9999 --options secrets.yaml --dry-run

deletes what the job's sessions would have deleted on this party's broker (Pulsar: the job's
topics and namespace; RabbitMQ: its vhost with its queues, policies and federation upstreams,
and its users), through the backend's own cleanup; safe to run twice.

"""
    + OPTION_HELP
)

DOCTOR_EXAMPLES = (
    """\
examples:
  fedtransport doctor --backend rabbitmq --option host=10.0.0.5 --option user=admin --option password=secret
  fedtransport doctor --backend pulsar --option service_url=pulsar://10.0.0.4:6650 \\
      --option admin_url=http://10.0.0.4:8080 --option token=file:///etc/pulsar/admin.jwt
  fedtransport doctor --backend pulsar --route-table route_tables/pulsar_route_table.yaml \\
      --party 9999 --json

checks connectivity, TLS, authentication, plugins (RabbitMQ) or admin access (Pulsar), then
opens a throw-away job on the broker and moves one object (--no-roundtrip skips that); each
failure says what is wrong and how to fix it; exit code 1 when anything failed.

"""
    + OPTION_HELP
)


# ---------------------------------------------------------------------------- options


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; the value is JSON when it parses, else the string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def load_options(backend: str, files: Sequence[str | Path] = (), pairs: Sequence[str] = ()) -> dict[str, Any]:
    """Options from YAML/JSON files (a ``backend:`` section if present) and ``KEY=VALUE`` pairs."""
    options: dict[str, Any] = {}
    for f in files:
        path = Path(f)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"options file {path}: cannot read it: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"options file {path}: not valid YAML: {exc}") from exc
        if data is None:
            continue
        if not isinstance(data, Mapping):
            raise ConfigError(f"options file {path}: the top level must be a mapping of option keys")
        if isinstance(data.get(backend), Mapping):
            data = data[backend]
        options.update({str(k): v for k, v in data.items()})
    for text in pairs:
        key, value = parse_option(text)
        options[key] = value
    return options


def _add_connection_args(p: argparse.ArgumentParser, *, backends: Sequence[str]) -> None:
    p.add_argument("--backend", required=True, choices=backends, help="the broker kind")
    p.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a backend option (repeatable); VALUE is JSON when it parses",
    )
    p.add_argument(
        "--options",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML/JSON file of options (repeatable; later files win)",
    )
    p.add_argument("--route-table", metavar="FILE", help="fill this party's broker address from a route table")
    p.add_argument("--party", metavar="ID", help="this party: ID or ROLE:ID (needed with --route-table)")


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fedtransport",
        formatter_class=raw,
        epilog=EXAMPLES,
        description="Federated-learning data transport over Pulsar and RabbitMQ.",
    )
    parser.add_argument("--version", action="version", version=f"fedtransport {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v for INFO logs, -vv for DEBUG")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run a two-party secure sum and table round trip",
        formatter_class=raw,
        description="guest 9999 and host 10000 run a secure sum and a table round trip and print what moved.",
        epilog=DEMO_EXAMPLES,
    )
    backends = available()  # built-in ones whose broker client is installed, and plugins
    demo.add_argument("--backend", choices=backends, default="pulsar", help="default: pulsar, on an embedded broker")

    route = sub.add_parser(
        "route",
        help="show or check a route table",
        formatter_class=raw,
        epilog=ROUTE_EXAMPLES,
        description="Read a route table in FATE's format (pulsar_route_table.yaml or rabbitmq_route_table.yaml).",
    )
    route_sub = route.add_subparsers(dest="route_command", required=True, metavar="ACTION")
    show = route_sub.add_parser(
        "show",
        help="print resolved endpoints and Pulsar cluster registrations",
        formatter_class=raw,
        epilog=ROUTE_EXAMPLES,
        description="Print every listed party's endpoint (or only --party's, which may "
        "be a party the table reaches through its default section) and, "
        "for Pulsar tables, the JSON body of the cluster registration "
        "(PUT /admin/v2/clusters/NAME).",
    )
    show.add_argument("file", help="route table YAML")
    show.add_argument("--party", action="append", metavar="ID", help="only this party (repeatable)")
    show.add_argument("--kind", choices=["pulsar", "rabbitmq"], help="table format (default: guessed from keys)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    check = route_sub.add_parser(
        "check",
        help="validate a route table (exit 1 with the reason)",
        formatter_class=raw,
        epilog=ROUTE_EXAMPLES,
        description="Load the table and resolve every party in it; on a problem print "
        "the error naming the file and the key and exit 1. Keys the "
        "reader ignores (typos such as 'hots') are reported as warnings.",
    )
    check.add_argument("file", help="route table YAML")
    check.add_argument("--kind", choices=["pulsar", "rabbitmq"], help="table format (default: guessed from keys)")

    certs = sub.add_parser(
        "certs",
        help="make a CA and the star network's certificates",
        formatter_class=raw,
        epilog=CERTS_EXAMPLES,
        description="Write a private CA and one certificate per party ({party}.{domain}) "
        "and for the SNI proxy ({proxy}.{domain}): the openssl walk-through of "
        "FATE's star network in one command. An existing CA in --out is "
        "reused, so parties can be added later.",
    )
    certs.add_argument("--domain", required=True, help="the network's domain, e.g. fate.org")
    certs.add_argument("--party", action="append", required=True, metavar="ID", help="a party id (repeatable)")
    certs.add_argument("--proxy", default="proxy", help="the proxy's host label (default: proxy)")
    certs.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the files")
    certs.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="WHO=NAME",
        help="another DNS name or IP for party WHO (or the proxy) to answer to (repeatable)",
    )
    certs.add_argument("--key-type", choices=["ec", "rsa"], default="ec", help="EC P-256 (default) or RSA 2048")
    certs.add_argument("--days", type=int, default=825, help="validity of the certificates (default 825)")
    certs.add_argument("--ca-days", type=int, default=3650, help="validity of a new CA (default 3650)")
    certs.add_argument("--json", action="store_true", help="machine-readable output")

    keys = sub.add_parser(
        "keys",
        help="make this party's key pair for per-pair authentication",
        formatter_class=raw,
        epilog=KEYS_EXAMPLES,
        description="Make or show the X25519 key pair of option 'identity': the private key stays "
        "with the party, the public key goes into its route table entry.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = keys_sub.add_parser("new", help="write a new private key (0600), print its public key", epilog=KEYS_EXAMPLES,
                              formatter_class=raw)  # fmt: skip
    new.add_argument("--out", required=True, type=Path, metavar="PATH", help="the key file to write (not overwritten)")
    public = keys_sub.add_parser("public", help="print the public key of a key file", epilog=KEYS_EXAMPLES,
                                 formatter_class=raw)  # fmt: skip
    public.add_argument("file", type=Path, help="a private key file written by 'keys new'")
    for p in (new, public):
        p.add_argument("--party", default="PARTY_ID", type=_party_id, metavar="ID",
                       help="the party id to print the entry under")  # fmt: skip
        p.add_argument("--json", action="store_true", help="machine-readable output")

    cleanup = sub.add_parser(
        "cleanup",
        help="delete the broker resources of a crashed job",
        formatter_class=raw,
        epilog=CLEANUP_EXAMPLES,
        description="Delete what job JOB left on this party's broker.",
    )
    _add_connection_args(cleanup, backends=backends)
    cleanup.add_argument("--job", required=True, help="the job id (the job_id given to Federation.connect)")
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    cleanup.add_argument("--json", action="store_true", help="machine-readable output")

    doctor = sub.add_parser(
        "doctor",
        help="check a broker: connectivity, auth, plugins, admin access",
        formatter_class=raw,
        epilog=DOCTOR_EXAMPLES,
        description="Check that this party's broker can serve fedtransport jobs.",
    )
    _add_connection_args(doctor, backends=backends)
    doctor.add_argument("--no-roundtrip", action="store_true", help="skip the probe job")
    doctor.add_argument("--timeout", type=float, default=10.0, help="seconds per network check (default 10)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")

    from .bench import add_arguments as bench_arguments  # light: the workloads import numpy in children

    bench = sub.add_parser(
        "bench",
        help="throughput: raw broker client vs fedtransport",
        formatter_class=raw,
        description="Run the throughput benchmark on local brokers (or chart saved results).",
        epilog="examples:\n"
        "  fedtransport bench --backend pulsar --repeat 2 --json pulsar.json\n"
        "  fedtransport bench --backend rabbitmq --only raw-large object table\n"
        "  fedtransport bench --backend pulsar --partitions 4 16 64 --only raw-large table-4 table-16 table-64\n"
        "  fedtransport bench --from-json benchmarks/results/throughput-*.json --chart docs/benchmarks.png\n\n"
        "workloads: raw-large, object, table, table-N, raw-small, small, small-async (see fedtransport.bench)\n"
        "--mib sizes every large one (raw-large, object, table, table-N): the raw client moves\n"
        "exactly the bytes of each, so a ratio compares equal transfers; a ratio needs its raw\n"
        "baseline (raw-large, raw-small) in the same run\n\n"
        "needs the bench extra: pip install 'fedtransport[bench]'",
    )
    bench_arguments(bench)
    return parser


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = _Out()
    commands: dict[str, Callable[[argparse.Namespace, _Out], int]] = {
        "demo": _demo,
        "route": route_command,
        "certs": _certs,
        "keys": _keys,
        "cleanup": _cleanup,
        "doctor": _doctor,
        "bench": _bench,
    }
    try:
        return commands[args.command](args, out)
    except FederationError as exc:
        out.err(f"fedtransport {args.command}: error: {exc}")
        return 1


class _Out:
    """stdout/stderr looked up at call time, so redirected streams (tests) are honoured."""

    def __call__(self, text: str = "") -> None:
        print(text, file=sys.stdout)

    def err(self, text: str) -> None:
        print(text, file=sys.stderr)


def _demo(args: argparse.Namespace, out: _Out) -> int:
    from .demo import demo as run_demo

    return 0 if run_demo(args.backend) else 1


# ---------------------------------------------------------------------------- certs


def _certs(args: argparse.Namespace, out: _Out) -> int:
    from . import certs

    extra: dict[str, list[str]] = {}
    for item in args.san:
        who, sep, name = item.partition("=")
        if not sep or not who or not name:
            raise ConfigError(
                f"--san takes WHO=NAME (a party id or the proxy name, then a DNS name or IP), got {item!r}"
            )
        extra.setdefault(who, []).append(name)
    existing_ca = (args.out / "ca.cert.pem").exists() and (args.out / "ca.key.pem").exists()
    star = certs.make_star(
        args.out,
        args.domain,
        args.party,
        args.proxy,
        key_type=args.key_type,
        days=args.days,
        ca_days=args.ca_days,
        extra_sans=extra,
    )
    hosts = {**{pid: p for pid, p in star.parties.items()}, args.proxy: star.proxy}
    if args.json:
        doc = {
            "ca": {"cert": str(star.ca_cert), "key": str(star.ca_key), "reused": existing_ca},
            "hosts": {
                who: {
                    "hostname": p.hostname,
                    "sans": list(p.sans),
                    "cert": str(p.cert),
                    "key": str(p.key),
                    "combined": str(p.combined),
                }
                for who, p in hosts.items()
            },
        }
        out(json.dumps(doc, indent=2))
        return 0
    out(f"CA ({'reused' if existing_ca else 'new'}):")
    out(f"  {star.ca_cert}   trust this: tlsTrustCertsFilePath / ssl ca_file")
    out(f"  {star.ca_key}    keep private (0600)")
    for who, p in hosts.items():
        role = "proxy" if who == args.proxy else f"party {who}"
        out(f"{role}: answers to SNI {', '.join(p.sans)}")
        out(f"  {p.cert}")
        out(f"  {p.key}   (0600)")
        out(f"  {p.combined}   cert + key (0600)")
    return 0


# ---------------------------------------------------------------------------- keys


def _party_id(text: str) -> str:
    """A party id as :class:`~fedtransport.Party` takes it, checked before a key is written: the
    printed route-table line must load, and an id like ``x: {y`` would make it other YAML."""
    from .party import Party

    try:
        return Party("party", text).party_id
    except ConfigError as exc:  # argparse shows an ArgumentTypeError's text, a ValueError's type only
        raise argparse.ArgumentTypeError(str(exc)) from None


def _keys(args: argparse.Namespace, out: _Out) -> int:
    from .identity import new_identity, parse_identity, public_key_text

    if args.keys_command == "new":
        key = new_identity(args.out)
    else:
        try:
            key = parse_identity(args.file)
        except ValueError as exc:
            raise ConfigError(f"{args.file}: {exc}") from None
    path = args.out if args.keys_command == "new" else args.file
    entry = {str(args.party): {"public_key": public_key_text(key)}}
    if args.json:
        out(json.dumps({"identity": str(path), "public_key": public_key_text(key), "route_table": entry}, indent=2))
        return 0
    if args.keys_command == "new":
        out(f"wrote {path} (0600): this party's private key, option identity={path}; keep it private")
    out(f"add to party {args.party}'s entry in every party's route table (or to their option peer_keys):")
    out(f'  {args.party}: {{public_key: "{public_key_text(key)}"}}')
    return 0


# ---------------------------------------------------------------------------- cleanup, doctor


def _connection(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from .doctor import parse_party

    options = load_options(args.backend, args.options, args.option)
    return options, parse_party(args.party)


def _cleanup(args: argparse.Namespace, out: _Out) -> int:
    from .doctor import cleanup_job

    options, party = _connection(args)
    report = cleanup_job(args.backend, args.job, options, args.route_table, party, dry_run=args.dry_run)
    if args.json:
        out(json.dumps(report.__dict__, indent=2))
        return 1 if report.left else 0
    out(f"job {report.job_id} on the {report.target}:")
    if not report.found:
        out("  nothing found: already clean")
    for item in report.found:
        out(f"  {'found' if args.dry_run else 'deleted'}  {item}")
    if args.dry_run:
        out("dry run: nothing deleted")
        return 0
    if report.left:
        for item in report.left:
            out.err(f"  still there: {item}")
        out.err("some resources are still there (the broker may be deleting them); run cleanup again")
        return 1
    out("nothing of the job is left")
    return 0


def _doctor(args: argparse.Namespace, out: _Out) -> int:
    from .doctor import format_checks, run_doctor, summary

    options, party = _connection(args)
    checks = run_doctor(
        args.backend, options, args.route_table, party, roundtrip=not args.no_roundtrip, timeout=args.timeout
    )
    code, verdict = summary(checks)
    if args.json:
        out(json.dumps({"backend": args.backend, "ok": code == 0, "checks": [c.as_dict() for c in checks]}, indent=2))
        return code
    out(f"fedtransport doctor: {args.backend}")
    format_checks(checks, out)
    out(f"result: {verdict}")
    return code


def _bench(args: argparse.Namespace, out: _Out) -> int:
    from .bench import execute

    return execute(args, out)


if __name__ == "__main__":
    sys.exit(main())
