"""Attack tests of the direct-boot path check (security review, issue 6, finding 1).

Real files and symlinks on disk: the check is about what the filesystem resolves to.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from guardfab.errors import NotAuthorizedError
from guardfab.hypervisor.bootpaths import DirectBootRefusedError, check_direct_boot
from guardfab.hypervisor.incoming import receive
from guardfab.hypervisor.provision import provision
from guardfab.hypervisor.spec import DirectKernel


@pytest.fixture
def boot_dir(tmp_path: Path) -> Path:
    allowed = tmp_path / "boot"
    allowed.mkdir()
    (allowed / "vmlinuz").write_bytes(b"kernel")
    (allowed / "initrd.img").write_bytes(b"initrd")
    (tmp_path / "secret.pem").write_bytes(b"host key")
    return allowed


def _boot(kernel: Path, initrd: Path) -> DirectKernel:
    return DirectKernel(kernel, initrd, "console=ttyS0")


def test_files_inside_the_allowed_dir_pass_resolved(boot_dir: Path) -> None:
    (boot_dir / "vmlinuz-current").symlink_to("vmlinuz")  # a symlink that stays inside is fine
    boot = _boot(boot_dir / "vmlinuz-current", boot_dir / "sub" / ".." / "initrd.img")
    (boot_dir / "sub").mkdir()
    checked = check_direct_boot(boot, boot_dir)
    assert checked == DirectKernel(
        Path(os.path.realpath(boot_dir / "vmlinuz")),
        Path(os.path.realpath(boot_dir / "initrd.img")),
        "console=ttyS0",
    )


def test_no_boot_is_nothing_to_check() -> None:
    assert check_direct_boot(None, None) is None


def _attack_symlink_out(boot_dir: Path) -> DirectKernel:
    (boot_dir / "initrd-link").symlink_to(boot_dir.parent / "secret.pem")
    return _boot(boot_dir / "vmlinuz", boot_dir / "initrd-link")


def _make_subdir(boot_dir: Path) -> DirectKernel:
    (boot_dir / "modules").mkdir()
    return _boot(boot_dir / "vmlinuz", boot_dir / "modules")


ATTACKS: dict[str, tuple[Callable[[Path], DirectKernel], str]] = {
    "a host file outside": (
        lambda d: _boot(d / "vmlinuz", Path("/etc/guardfab/host-encryption.pem")),
        "outside the allowed directory",
    ),
    "a symlink inside pointing out": (_attack_symlink_out, "outside the allowed directory"),
    "dot-dot out of the dir": (
        lambda d: _boot(d / ".." / "secret.pem", d / "initrd.img"),
        "outside the allowed directory",
    ),
    "a directory": (lambda d: _boot(d / "vmlinuz", d / "."), "outside the allowed directory"),
    "a subdirectory": (_make_subdir, "not a regular file"),
    "a missing file": (lambda d: _boot(d / "vmlinuz", d / "nope"), "cannot be read"),
    "a relative path": (lambda d: _boot(Path("vmlinuz"), d / "initrd.img"), "not an absolute path"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_are_refused_naming_the_path(boot_dir: Path, attack: str) -> None:
    make, reason = ATTACKS[attack]
    with pytest.raises(DirectBootRefusedError, match=reason) as caught:
        check_direct_boot(make(boot_dir), boot_dir)
    assert isinstance(caught.value, NotAuthorizedError)
    assert "direct_boot_dir" in caught.value.diagnostics()


def test_no_allowed_dir_refuses_every_direct_boot(boot_dir: Path) -> None:
    with pytest.raises(DirectBootRefusedError, match="no direct_boot_dir configured"):
        check_direct_boot(_boot(boot_dir / "vmlinuz", boot_dir / "initrd.img"), None)


def test_allowed_dir_given_through_a_symlink_still_works(boot_dir: Path) -> None:
    alias = boot_dir.parent / "boot-alias"
    alias.symlink_to(boot_dir)
    checked = check_direct_boot(_boot(alias / "vmlinuz", alias / "initrd.img"), alias)
    assert checked is not None
    assert checked.kernel == Path(os.path.realpath(boot_dir / "vmlinuz"))


@pytest.mark.parametrize("entry", [provision, receive])
def test_the_library_entry_points_have_no_permissive_default(entry: Callable[..., object]) -> None:
    # A caller that forgets the host's direct_boot_dir must not get "any file" (the
    # old default): it must name the directory, None, or LOCAL_ROOT_BOOT on purpose.
    parameter = inspect.signature(entry).parameters["direct_boot_dir"]
    assert parameter.default is inspect.Parameter.empty
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
