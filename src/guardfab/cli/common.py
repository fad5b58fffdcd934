"""Options shared by the tenant commands: the guardfab home and passphrases.

Passphrases are never taken as option values (they would show in ``ps`` and in
shell history): they come from a file (``--passphrase-file``) or a hidden prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from guardfab.errors import UsageError
from guardfab.files import read_bounded
from guardfab.tenant.guardians import GuardianStore, default_home

home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="guardfab home holding the guardian store [default: $GUARDFAB_HOME or ~/.guardfab].",
)

passphrase_file_option = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File whose first line is the passphrase of the private keys (never pass it as an "
    "argument). Without it, encrypted keys prompt on a terminal.",
)


def guardian_store(home: Path | None) -> GuardianStore:
    """The guardian store under ``home`` (or the default home)."""
    return GuardianStore(home or default_home())


def read_passphrase(path: Path | None, *, prompt: bool, confirm: bool = False) -> str | None:
    """Read a passphrase from ``path``, or prompt (hidden) if ``prompt`` is set and stdin is a TTY.

    Returns None when neither applies (the key is then expected unencrypted).
    """
    if path is not None:
        text = read_bounded(path, limit=4096, what="passphrase file").decode("utf-8", "replace")
        value = text.splitlines()[0] if text else ""
        if not value:
            raise UsageError(f"passphrase file {path} is empty")
        return value
    if prompt and sys.stdin.isatty():
        value_any: Any = click.prompt(
            "Passphrase",
            hide_input=True,
            confirmation_prompt=confirm,
            default="",
            show_default=False,
        )
        return str(value_any) or None
    return None
