#!/usr/bin/env bash
# Fetch the signed UEFI boot chain that a shielded VM's template disk carries:
# Debian's shim (signed by Microsoft's UEFI CA, which OVMF_VARS_4M.ms.fd trusts)
# and Debian's grub (signed by Debian's key, which that shim has built in).
# Output, cached and never committed (cache/ is git-ignored):
#
#   cache/guest/efi/BOOTX64.EFI   shimx64.efi.signed from shim-signed
#   cache/guest/efi/grubx64.efi   grubx64.efi.signed from grub-efi-amd64-signed
#   cache/guest/efi/manifest      package versions, sha256 of both files
#
# Idempotent: it unpacks again only when this script or a package version
# changed. Fails loudly (non-zero, with the reason) when a package cannot be
# fetched or lacks its binary: tests must not pass by skipping the boot chain.
#
#   scripts/build-boot-chain.sh            build if needed, print the manifest
#   scripts/build-boot-chain.sh --force    rebuild
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${GUARDFAB_GUEST_DIR:-$root/cache/guest}/efi
force=0
[[ "${1:-}" == "--force" ]] && force=1

die() {
  echo "build-boot-chain: $*" >&2
  exit 1
}

# package name, then the file inside it that becomes the ESP's binary.
shim_pkg=shim-signed
shim_file=usr/lib/shim/shimx64.efi.signed
grub_pkg=grub-efi-amd64-signed
grub_file=usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed

candidate() {
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2; exit }'
}

shim_ver=$(candidate "$shim_pkg")
grub_ver=$(candidate "$grub_pkg")
if [[ -z "$shim_ver" || -z "$grub_ver" ]]; then
  echo "build-boot-chain: apt lists do not know $shim_pkg or $grub_pkg; running apt-get update" >&2
  apt-get update -qq || die "apt-get update failed"
  shim_ver=$(candidate "$shim_pkg")
  grub_ver=$(candidate "$grub_pkg")
fi
[[ -n "$shim_ver" ]] || die "apt-cache knows no $shim_pkg (is a Debian mirror with main reachable?)"
[[ -n "$grub_ver" ]] || die "apt-cache knows no $grub_pkg (is a Debian mirror with main reachable?)"

stamp=$(sha256sum <"$0" | cut -c1-16)-$shim_pkg=$shim_ver-$grub_pkg=$grub_ver
# Test workers may build at the same time: one builds, the others wait and reuse it.
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if ((!force)) && [[ -f "$out/manifest" ]] && grep -qxF "stamp=$stamp" "$out/manifest"; then
  cat "$out/manifest"
  exit 0
fi

mkdir -p "$out/debs"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetch() {
  # fetch PACKAGE VERSION: download that version's .deb into the cache unless already there.
  # apt names the file PACKAGE_VERSION_ARCH.deb with the version's ':' written as %3a.
  local name=$1 version=${2//:/%3a} found
  found=$(compgen -G "$out/debs/${name}_${version}_*.deb" | head -n1 || true)
  if [[ -z "$found" ]]; then
    echo "build-boot-chain: downloading $name $2" >&2
    (cd "$out/debs" && apt-get -q -o APT::Sandbox::User=root download "$name=$2" >&2) ||
      die "cannot download the Debian package $name=$2"
    found=$(compgen -G "$out/debs/${name}_${version}_*.deb" | head -n1 || true)
  fi
  [[ -n "$found" ]] || die "apt-get download left no ${name}_${version}_*.deb in $out/debs"
  echo "$found"
}

extract() {
  # extract DEB FILE DEST: unpack DEB and copy FILE out of it to DEST.
  local deb=$1 file=$2 dest=$3 tree
  tree=$work/$(basename "$deb" .deb)
  dpkg-deb -x "$deb" "$tree" || die "cannot unpack $deb"
  [[ -f "$tree/$file" ]] || die "$(basename "$deb") has no /$file"
  cp "$tree/$file" "$dest"
}

shim_deb=$(fetch "$shim_pkg" "$shim_ver")
grub_deb=$(fetch "$grub_pkg" "$grub_ver")
extract "$shim_deb" "$shim_file" "$work/BOOTX64.EFI"
extract "$grub_deb" "$grub_file" "$work/grubx64.efi"

mv -f "$work/BOOTX64.EFI" "$out/BOOTX64.EFI"
mv -f "$work/grubx64.efi" "$out/grubx64.efi"
{
  echo "stamp=$stamp"
  echo "shim_package=$shim_pkg=$shim_ver"
  echo "grub_package=$grub_pkg=$grub_ver"
  echo "shim_sha256=$(sha256sum "$out/BOOTX64.EFI" | cut -d' ' -f1)"
  echo "grub_sha256=$(sha256sum "$out/grubx64.efi" | cut -d' ' -f1)"
} >"$out/manifest.tmp"
mv -f "$out/manifest.tmp" "$out/manifest"
cat "$out/manifest"
