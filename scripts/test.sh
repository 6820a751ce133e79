#!/usr/bin/env bash
# `make test`: lint, then unit tests, then integration tests on real QEMU, nftables, boto3...
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/python -m pytest tests "$@"
