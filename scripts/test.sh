#!/usr/bin/env bash
# Set everything up, then run the whole test suite: lint, types, unit, attack,
# fuzz and end-to-end tests. Exit status 0 only if every part passed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev

echo "== ruff"
.venv/bin/ruff check src tests bench fuzz scripts
.venv/bin/ruff format --check src tests bench fuzz scripts
echo "== mypy (strict)"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  # pytest's "no tests collected" must never pass (or fail) by accident.
  echo "test: pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit $status
