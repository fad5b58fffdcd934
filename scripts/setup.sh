#!/usr/bin/env bash
# Install everything guardfab needs on Debian 12, as root: Debian packages and a
# virtualenv (.venv) with hash-pinned Python dependencies. Safe to run again:
# it installs only what is missing or changed.
#
#   scripts/setup.sh          runtime only (what a guardfab node needs)
#   scripts/setup.sh --dev    also the test and lint tools (for scripts/test.sh; the demo
#                             needs only the runtime: its software hosts are guardfab.softhost)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

# Debian packages. The product needs python3 + venv, and libtss2 for tpm2-pytss on
# guarded hosts (swtpm stands in for a host TPM in tests); the demo and tests also use
# openssl (certificates, benchmarks) and coreutils (sha256sum); template disks that boot
# under secure boot are built with dosfstools, mtools, fdisk and e2fsprogs (ADR 0013).
apt_packages=(python3 python3-venv python3-dev build-essential pkg-config openssl coreutils
  libtss2-dev swtpm swtpm-tools busybox-static cpio e2fsprogs qemu-system-x86 qemu-utils ovmf
  softhsm2 dosfstools mtools fdisk)
# The tests start real etcd members (the store's etcd backend, ADR 0022). A guardfab
# node does not need etcd itself: an HGS on etcd talks to a cluster run for it.
((dev)) && apt_packages+=(etcd-server)

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts etcd on 127.0.0.1:2379 when it installs it (systemd, or its init.d
  # script where no policy-rc.d forbids it). The tests run their own members on free
  # ports; a stray unauthenticated etcd is not wanted. Only one this run installed is
  # stopped and disabled.
  if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
    if [[ -d /run/systemd/system ]]; then
      systemctl disable --now etcd >/dev/null 2>&1 || echo "setup: could not disable etcd.service" >&2
    elif [[ -x /etc/init.d/etcd ]]; then
      /etc/init.d/etcd stop >/dev/null 2>&1 || true
      update-rc.d etcd disable >/dev/null 2>&1 || echo "setup: could not disable /etc/init.d/etcd" >&2
    fi
  fi
fi

# The virtualenv, from Debian's own Python so nothing depends on a hand-made one.
locks=(requirements.lock)
((dev)) && locks+=(requirements-dev.lock)
stamp=".venv/.guardfab-setup-$(cat pyproject.toml "${locks[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  echo "setup: creating .venv with pinned dependencies (${locks[*]})"
  [[ -x .venv/bin/python ]] || /usr/bin/python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip==26.3"
  for lock in "${locks[@]}"; do
    .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r "$lock"
  done
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  rm -f .venv/.guardfab-setup-*
  touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/guardfab --version))"
