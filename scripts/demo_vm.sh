#!/usr/bin/env bash
# Stand-ins for the demo's shielded VM (a demo aid, not part of the product):
#
#   scripts/demo_vm.sh guest                 build (or reuse) the tiny Debian test guest and the
#                                            signed boot chain (scripts/build-guest.sh, cached
#                                            under cache/guest); prints the guest's directory
#   scripts/demo_vm.sh template OUT MARKER   build the template disk OUT: GPT, an EFI system
#                                            partition with Debian's signed shim, grub and
#                                            kernel and the guest's initramfs, and an ext4 root
#                                            whose marker.txt holds MARKER (the guest shows it).
#                                            A shielded VM's firmware boots it (ADR 0013).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
guest_dir=${GUARDFAB_GUEST_DIR:-$repo/cache/guest}
case "${1:-}" in
  guest)
    "$repo/scripts/build-guest.sh" >&2
    echo "$guest_dir"
    ;;
  template)
    [[ $# -eq 3 ]] || { echo "usage: $0 template OUT MARKER" >&2; exit 2; }
    "$repo/scripts/build-guest.sh" >/dev/null
    python3 -m guardfab.hypervisor.efi_disk "$2" --boot-chain "$guest_dir/efi" \
      --kernel "$guest_dir/vmlinuz" --initramfs "$guest_dir/initramfs.gz" --marker "$3"
    ;;
  *)
    echo "usage: $0 guest | template OUT MARKER" >&2
    exit 2
    ;;
esac
