#!/usr/bin/env bash
# Stand-ins for the demo's shielded VM (a demo aid, not part of the product):
#
#   scripts/demo_vm.sh guest                 build (or reuse) the tiny Debian test guest
#                                            (scripts/build-guest.sh, cached under cache/guest);
#                                            prints the directory holding vmlinuz, initramfs.gz
#   scripts/demo_vm.sh template OUT MARKER   build a real ext4 template disk OUT whose
#                                            marker.txt holds MARKER (the guest shows it)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
  guest)
    "$repo/scripts/build-guest.sh" >&2
    echo "${GUARDFAB_GUEST_DIR:-$repo/cache/guest}"
    ;;
  template)
    [[ $# -eq 3 ]] || { echo "usage: $0 template OUT MARKER" >&2; exit 2; }
    python3 -m guardfab.hypervisor.template_image "$2" --marker "$3"
    ;;
  *)
    echo "usage: $0 guest | template OUT MARKER" >&2
    exit 2
    ;;
esac
