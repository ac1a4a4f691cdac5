#!/usr/bin/env bash
# Quickstart 2: install what the tests need (RabbitMQ and haproxy from apt, Python packages
# into .venv) and run the whole suite against real brokers. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# Java 17: pyspark (tests/test_spark.py) and the real Apache Pulsar broker (PulsarStandalone);
# maven resolves that broker's jars from Maven Central once, into ~/.cache/fedtransport/pulsar
apt_install rabbitmq-server haproxy openjdk-17-jre-headless maven
# the Debian package starts a system node on 5672; the tests start their own nodes and do not need it
setup_venv test,bench,spark,fate  # bench: matplotlib for the benchmark chart test; spark: pyspark for tests/test_spark.py
# tests/test_fate2.py: pyfate 2.2.0 without its pins (torch, transformers...); the fate extra above
# holds what FATE imports (pyproject.toml)
python -m pip install -q --disable-pip-version-check --no-deps pyfate==2.2.0
ruff check fedtransport tests benchmarks
# py.typed ships our annotations to users: they must hold ([tool.mypy] in pyproject.toml: strict)
mypy || { echo "scripts/test.sh: mypy --strict found type errors in fedtransport (listed above)" >&2; exit 1; }
echo "quarantined (see the 'quarantine' marks; run with: bash scripts/test.sh -m quarantine): $(grep -l 'mark.quarantine' tests/*.py | tr '\n' ' ')" >&2
exec python -m pytest -q -p no:cacheprovider -m "not quarantine" "$@"
