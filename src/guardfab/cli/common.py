"""Options shared by the tenant commands: the guardfab home and passphrases.

Passphrases are never taken as option values (they would show in ``ps`` and in
shell history): they come from a file (``--passphrase-file``) or a hidden prompt.
"""

from __future__ import annotations

import re
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


#: An identifier given where an option could start: a dash, then 8+ base64url characters.
_DASHED_ID = re.compile(r"-[A-Za-z0-9_][A-Za-z0-9_-]{7,}")


class IdArgumentCommand(click.Command):
    """A command whose argument is an identifier that may begin with ``-``.

    Key ids and thumbprints are base64url (RFC 7638), so one in 64 starts with
    ``-`` and click would read it as options ("No such option: -x"). Such a
    token, before any ``--`` and not the value of an option, is taken as the
    argument: these commands have no short option but ``-h``, so a dash and 8
    or more id characters cannot be meant as options. ``-- ID`` works too.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        takes_value = {
            name
            for param in self.params
            if isinstance(param, click.Option) and not param.is_flag and not param.count
            for name in param.opts
        }
        ids = [
            index
            for index, arg in enumerate(args[:end])
            if _DASHED_ID.fullmatch(arg) and (index == 0 or args[index - 1] not in takes_value)
        ]
        if ids:
            rest = [arg for index, arg in enumerate(args[:end]) if index not in ids]
            args = [*rest, "--", *(args[index] for index in ids), *args[end + 1 :]]
        return super().parse_args(ctx, args)
