"""Identifier arguments that start with ``-`` (one base64url key id in 64 does).

``guardfab hgs kps signer remove -xjDz...`` used to fail with "No such option:
-x" (and ``test_kps_cli`` failed whenever the HGS's own signer id began with a
dash). Commands taking key ids, thumbprints or candidate ids now take such a
token as the argument.
"""

from __future__ import annotations

import click
import pytest

from guardfab.cli.hgs_admin import host_remove_key
from guardfab.cli.hgs_kps import signer_remove

DASHED = "-xjDzYDUx52qtGHpjJHJcka-3Aq_FJbWGuS0io5uf4I"
CONNECTION = ["--dir", "/srv/hgs"]


def parsed(command: click.Command, args: list[str]) -> dict[str, object]:
    with command.make_context(command.name or "command", args) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize(
    "args",
    [
        [DASHED, *CONNECTION],
        [*CONNECTION, DASHED],
        [*CONNECTION, "--json", DASHED],
        [*CONNECTION, "--", DASHED],
    ],
    ids=["first", "last", "after-a-flag", "after-double-dash"],
)
def test_a_key_id_starting_with_a_dash_is_the_argument(args: list[str]) -> None:
    assert parsed(signer_remove, args)["kid"] == DASHED


def test_an_option_value_starting_with_a_dash_stays_the_option_value() -> None:
    params = parsed(
        host_remove_key, ["--token-file", "-odd-token-file", "--url", "https://h", DASHED]
    )
    assert params["key_id"] == DASHED
    assert str(params["token_file"]) == "-odd-token-file"


@pytest.mark.parametrize("token", ["-x", "-xj", "--no-such-option"])
def test_short_dashed_tokens_are_still_unknown_options(token: str) -> None:
    with pytest.raises(click.NoSuchOption):
        parsed(signer_remove, [token, "kid", *CONNECTION])


def test_two_ids_are_still_one_too_many() -> None:
    with pytest.raises(click.UsageError):
        parsed(signer_remove, [DASHED, DASHED + "x", *CONNECTION])
