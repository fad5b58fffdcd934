#!/usr/bin/env bash
# Build guardfab's tiny test guest from Debian packages: the current Debian
# kernel (linux-image-amd64's dependency) and a busybox initramfs whose /init is
# guest/init. Output, cached and never committed (cache/ is git-ignored):
#
#   cache/guest/vmlinuz        the kernel (Debian's signed build)
#   cache/guest/initramfs.gz   busybox + guest/init + the modules it needs
#   cache/guest/manifest       kernel package and version, sha256 of both files
#   cache/guest/efi/           the signed boot chain (scripts/build-boot-chain.sh)
#
# A shielded VM's template disk carries this kernel and initramfs behind the
# signed chain (python -m guardfab.hypervisor.efi_disk; scripts/demo_vm.sh template).
#
# Idempotent: it rebuilds only when guest/init, this script or the kernel
# package changed. Fails loudly (non-zero, with the reason) when a package
# cannot be fetched: tests must not pass by skipping the guest.
#
#   scripts/build-guest.sh            build if needed, print the manifest
#   scripts/build-guest.sh --force    rebuild
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${GUARDFAB_GUEST_DIR:-$root/cache/guest}
force=0
[[ "${1:-}" == "--force" ]] && force=1

die() {
  echo "build-guest: $*" >&2
  exit 1
}

# Modules the guest loads, besides their dependencies (resolved from modules.dep).
# crc32c_generic is no symbol dependency of ext4 (it asks the crypto API at mount
# time), so it is named here and loaded first.
wanted_modules=(crc32c_generic virtio_pci virtio_blk virtio_net ext4)

kernel_package() {
  # The kernel that Debian's linux-image-amd64 meta package currently points at.
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9].*-amd64$/ { print $2; exit }'
}

pkg=$(kernel_package)
if [[ -z "$pkg" ]]; then
  echo "build-guest: apt lists do not know linux-image-amd64; running apt-get update" >&2
  apt-get update -qq || die "apt-get update failed"
  pkg=$(kernel_package)
fi
[[ -n "$pkg" ]] || die "no linux-image-*-amd64 package found with apt-cache (is a Debian mirror reachable?)"
kver=${pkg#linux-image-}

# Debian's signed shim and grub, for the template disks that boot this kernel
# under secure boot (cached and checked by their own script).
"$root/scripts/build-boot-chain.sh" >/dev/null || die "scripts/build-boot-chain.sh failed"

stamp=$(cat "$root/guest/init" "$0" | sha256sum | cut -c1-16)-$pkg
# Test workers may build at the same time: one builds, the others wait and reuse it.
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if ((!force)) && [[ -f "$out/manifest" ]] && grep -qx "stamp=$stamp" "$out/manifest"; then
  cat "$out/manifest"
  exit 0
fi

mkdir -p "$out/debs"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetch() {
  # fetch PACKAGE: download its .deb into the cache unless already there.
  local name=$1
  if ! compgen -G "$out/debs/${name}_*.deb" >/dev/null; then
    echo "build-guest: downloading $name" >&2
    (cd "$out/debs" && apt-get -q -o APT::Sandbox::User=root download "$name" >&2) ||
      die "cannot download the Debian package $name"
  fi
  compgen -G "$out/debs/${name}_*.deb" | head -n1
}

kdeb=$(fetch "$pkg")
bdeb=$(fetch busybox-static)
dpkg-deb -x "$kdeb" "$work/kernel" || die "cannot unpack $kdeb"
dpkg-deb -x "$bdeb" "$work/busybox" || die "cannot unpack $bdeb"
busybox=$work/busybox/bin/busybox
[[ -x "$busybox" ]] || die "busybox-static has no bin/busybox"
moddir=$work/kernel/lib/modules/$kver
[[ -f "$work/kernel/boot/vmlinuz-$kver" ]] || die "$pkg has no boot/vmlinuz-$kver"

# modules.dep is made by depmod at install time, not shipped: make it with busybox.
"$busybox" depmod -b "$work/kernel" "$kver" || die "depmod failed"

# Resolve the wanted modules and their dependencies into load order (dependencies first).
declare -A seen=()
order=()
module_path() {
  awk -v m="$1" -F: '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n);
    gsub(/-/, "_", n); if (n == m) { print $1; exit } }' "$moddir/modules.dep"
}
add_module() {
  local rel=$1 dep
  [[ -n "${seen[$rel]:-}" ]] && return 0
  seen[$rel]=1
  for dep in $(awk -v r="$rel" -F': *' '$1 == r { print $2; exit }' "$moddir/modules.dep"); do
    add_module "$dep"
  done
  order+=("$rel")
}
for name in "${wanted_modules[@]}"; do
  if grep -qE "/${name//_/[-_]}\.ko" "$moddir/modules.builtin"; then
    continue # built into this kernel
  fi
  rel=$(module_path "$name")
  [[ -n "$rel" ]] || die "module $name is neither built in nor shipped by $pkg"
  add_module "$rel"
done

# The initramfs tree.
initrd=$work/initrd
mkdir -p "$initrd"/{bin,sbin,etc,proc,sys,dev,run,tmp,os,www,root,lib/modules}
cp "$busybox" "$initrd/bin/busybox"
for applet in $("$busybox" --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$initrd/bin/$applet"
done
: >"$initrd/etc/guest-modules"
for rel in "${order[@]}"; do
  mkdir -p "$initrd/lib/modules/$(dirname "$rel")"
  cp "$moddir/$rel" "$initrd/lib/modules/$rel"
  echo "$rel" >>"$initrd/etc/guest-modules"
done
install -m 0755 "$root/guest/init" "$initrd/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$initrd/etc/passwd"
printf 'root:*:19000:0:99999:7:::\n' >"$initrd/etc/shadow"
printf 'root:x:0:\n' >"$initrd/etc/group"

# A reproducible archive: sorted names, fixed owner and times.
find "$initrd" -exec touch -h -d @0 {} +
(cd "$initrd" && find . -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
  gzip -n -9 >"$work/initramfs.gz"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initramfs.gz" "$out/initramfs.gz"
{
  echo "stamp=$stamp"
  echo "kernel_package=$pkg"
  echo "kernel_version=$kver"
  echo "busybox_package=$(basename "$bdeb")"
  echo "modules=${order[*]}"
  echo "vmlinuz_sha256=$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)"
  echo "initramfs_sha256=$(sha256sum "$out/initramfs.gz" | cut -d' ' -f1)"
} >"$out/manifest.tmp"
mv -f "$out/manifest.tmp" "$out/manifest"
cat "$out/manifest"
