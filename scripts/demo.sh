#!/usr/bin/env bash
# Quickstart 1: two parties exchange data through an embedded Pulsar-protocol broker.
# Extra arguments go to `fedtransport demo` (e.g. --backend rabbitmq).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
setup_venv embedded
exec fedtransport demo "$@"
