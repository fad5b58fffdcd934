"""Which kernel and initramfs files a VM may boot directly (``-kernel``/``-initrd``).

QEMU runs as root and reads a direct kernel and initrd into the guest's memory,
where whoever runs the guest can read them back. A path that reaches QEMU
unchecked therefore reads any root-only file of the host (its host encryption
key, for one) into a VM its requester controls. So a direct boot is allowed
only from the one directory the host configuration names (``direct_boot_dir``),
and every path must resolve -- symlinks and ``..`` followed -- to a regular file
inside it. No directory configured means no direct boot at all.

Provisioning and an incoming live migration both call :func:`check_direct_boot`,
and pass QEMU the *resolved* paths it returns, so a symlink swapped later in the
allowed directory cannot lead out of it either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from guardfab.errors import NotAuthorizedError
from guardfab.hypervisor.spec import DirectKernel

_HINT = (
    "put the kernel and initramfs in the host's direct_boot_dir (host configuration) "
    "and name them by their paths there"
)


class DirectBootRefusedError(NotAuthorizedError):
    """A direct kernel or initrd path is outside the allowed directory, or not a regular file."""

    hint = _HINT


def check_direct_boot(boot: DirectKernel | None, allowed_dir: Path | None) -> DirectKernel | None:
    """The direct boot with its paths resolved, if both lie inside ``allowed_dir``.

    Args:
        boot: the requested kernel/initrd (``None``: the VM boots its disk; nothing to check).
        allowed_dir: the host's ``direct_boot_dir``; ``None`` refuses any direct boot.

    Returns:
        ``boot`` with ``kernel`` and ``initrd`` replaced by their resolved paths, or ``None``.

    Raises:
        DirectBootRefusedError: no directory configured, a path not absolute, resolving
            outside the directory, missing, or not a regular file.
    """
    if boot is None:
        return None
    if allowed_dir is None:
        raise DirectBootRefusedError(
            "direct kernel boot is not enabled on this host (no direct_boot_dir configured)"
        )
    root = Path(os.path.realpath(allowed_dir))
    return DirectKernel(
        kernel=_resolve_inside("kernel", boot.kernel, root),
        initrd=_resolve_inside("initrd", boot.initrd, root),
        cmdline=boot.cmdline,
    )


def _resolve_inside(what: str, path: Path, root: Path) -> Path:
    if not Path(path).is_absolute():
        raise DirectBootRefusedError(
            f"the direct boot {what} {str(path)!r} is not an absolute path"
        )
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(root) or resolved == root:
        raise DirectBootRefusedError(
            f"the direct boot {what} {str(path)!r} resolves to {str(resolved)!r}, "
            f"outside the allowed directory {str(root)!r}"
        )
    try:
        mode = resolved.stat().st_mode
    except OSError as exc:
        raise DirectBootRefusedError(
            f"the direct boot {what} {str(path)!r} cannot be read ({exc.strerror})"
        ) from exc
    if not stat.S_ISREG(mode):
        raise DirectBootRefusedError(f"the direct boot {what} {str(path)!r} is not a regular file")
    return resolved
