"""The ``fedtransport`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

EXAMPLES = """\
examples:
  fedtransport demo                      two parties, two processes, an embedded Pulsar broker
  fedtransport demo --backend memory     the same in one process, no broker
  fedtransport demo --backend rabbitmq   on a throw-away local RabbitMQ node
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedtransport",
        description="Federated-learning data transport over Pulsar and RabbitMQ.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedtransport {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v for INFO logs, -vv for DEBUG")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run a two-party secure sum and table round trip",
        description="guest 9999 and host 10000 run a secure sum and a table round trip and print what moved.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--backend", choices=["memory", "pulsar", "rabbitmq"], default="pulsar",
                      help="default: pulsar, on an embedded broker")  # fmt: skip

    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "demo":
        from .demo import demo as run_demo

        return 0 if run_demo(args.backend) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
