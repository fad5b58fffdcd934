#!/usr/bin/env bash
# Set everything up, then run the README's walkthrough end to end in a scratch
# directory (the same commands the README shows, extracted from it).
set -euo pipefail
cd "$(dirname "$0")/.."
# Runtime only: the demo's software hosts (scripts/demo_host.py) use guardfab.softhost,
# which needs nothing from requirements-dev.lock or tests/.
scripts/setup.sh
workdir=$(mktemp -d /tmp/guardfab-demo.XXXXXX)
echo "demo: working in $workdir"
.venv/bin/python scripts/walkthrough.py README.md > "$workdir/walkthrough.sh"
export PATH="$PWD/.venv/bin:$PATH" GUARDFAB_HOME="$workdir/home" GUARDFAB_REPO="$PWD"
cd "$workdir"
bash -euo pipefail -x walkthrough.sh
echo "demo: finished; files are in $workdir"
