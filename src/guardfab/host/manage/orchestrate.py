"""A live migration driven by the fabric administrator: two agents, two APIs, two tokens.

The CLI holds one client per host, each with that host's URL, CA and admin
token; neither agent ever calls the other, and no token goes from one to the
other. What the CLI carries is public or sealed (ADR 0015):

1. source ``outgoing``: the offer (VM record, sealed pairs, NVRAM, disks' path);
2. destination ``incoming``: it releases with its own certificate (a refusal
   ends here: nothing written, nothing sent), starts QEMU, answers
   address, port and salt;
3. source ``outgoing/send``: the stream, TLS-PSK under a key both derive;
4. destination ``incoming/finish``: the guest runs there, its pair committed;
5. source ``outgoing/leave``, then destination ``incoming/forward`` (the VM's
   host port, once the source let it go).

A failure in 2-4 after the destination's release: destination ``incoming/abort``
answers its sealed pair, source ``outgoing/take-back`` keeps it as pending and
runs the VM on. If that hand-back itself fails (an agent unreachable), the error
says so and how to finish it by hand (``vm migrate NAME --abort``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from guardfab.errors import GuardfabError, NotAuthorizedError, TransportError, UsageError

_WILDCARDS = {"0.0.0.0", "::"}  # noqa: S104 - recognized, not bound


class Agent(Protocol):
    """One agent's management API (:class:`~guardfab.host.manage.client.ManagementClient`)."""

    url: str

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the answer's JSON, or the server's typed error raised again."""
        ...


class HandBackError(TransportError):
    """A migration failed and the destination's key pair could not reach the source."""


class MovedWithErrorsError(TransportError):
    """The VM moved and runs at the destination, but a last step failed (not undone)."""

    hint = "the VM belongs to the destination now; see the warnings, fix, then retry that step"


@dataclass
class MigrationReport:
    """What the CLI prints: where the VM went, how long it took (no secret in it)."""

    name: str
    destination: str
    pid: int | None
    total_time_ms: int
    downtime_ms: int
    transferred_bytes: int
    warnings: list[str] = field(default_factory=list)


def _endpoint(answer: dict[str, Any], dest: Agent) -> dict[str, Any]:
    """The destination's endpoint; a wildcard address becomes its API's host."""
    endpoint = {k: answer[k] for k in ("address", "port", "salt")}
    if endpoint["address"] in _WILDCARDS:
        endpoint["address"] = urlsplit(dest.url).hostname or endpoint["address"]
    return endpoint


def migrate(source: Agent, dest: Agent, name: str, *, port: int | None = None) -> MigrationReport:
    """Move running VM ``name`` from ``source``'s host to ``dest``'s (see the module docstring).

    Raises:
        NotAuthorizedError: the destination was refused its keys (nothing moved).
        GuardfabError: any later failure, the VM running on at the source with
            the destination's pair handed back; :class:`HandBackError` if that
            hand-back failed too.
    """
    vm = f"/vms/{name}"
    offer = source.call("POST", f"{vm}/outgoing")
    try:
        answer = dest.call("POST", f"{vm}/incoming", {**offer, "port": port})
    except (NotAuthorizedError, UsageError):
        raise  # refused before its release, or by the KPS: nothing to hand back
    except GuardfabError as exc:
        _hand_back(source, dest, name, exc)
        raise
    try:
        stats = source.call("POST", f"{vm}/outgoing/send", _endpoint(answer, dest))
        landed = dest.call("POST", f"{vm}/incoming/finish")
    except GuardfabError as exc:
        _hand_back(source, dest, name, exc)
        raise
    report = MigrationReport(
        name, landed["destination"], landed.get("pid"), stats["total_time_ms"],
        stats["downtime_ms"], stats["transferred_bytes"],
    )  # fmt: skip
    for step, agent, path in (
        ("stop the source", source, f"{vm}/outgoing/leave"),
        ("open the VM's host port at the destination", dest, f"{vm}/incoming/forward"),
    ):
        try:
            agent.call("POST", path)
        except GuardfabError as exc:
            # The guest runs at the destination: the migration is not undone.
            report.warnings.append(f"the VM moved and runs at {dest.url}, but {step} failed: {exc}")
    return report


def _hand_back(source: Agent, dest: Agent, name: str, cause: GuardfabError) -> None:
    """The destination's pair back to the source, which runs the VM on."""
    try:
        pair = dest.call("POST", f"/vms/{name}/incoming/abort")
    except UsageError:
        return  # nothing released there (or already handed back)
    except GuardfabError as exc:
        raise HandBackError(
            f"VM {name!r}: the migration failed ({cause}) and the destination did not "
            f"answer its key pair ({exc})",
            hint="the VM runs on at the source; once the destination's agent is back, "
            f"run 'guardfab vm migrate {name} --abort' with both hosts' options",
        ) from cause
    take_back(source, name, pair, cause)


def take_back(source: Agent, name: str, pair: dict[str, Any], cause: Exception | None) -> None:
    """Give the source the destination's sealed pair (kp, vault)."""
    try:
        source.call(
            "POST", f"/vms/{name}/outgoing/take-back", {"kp": pair["kp"], "vault": pair["vault"]}
        )
    except GuardfabError as exc:
        raise HandBackError(
            f"VM {name!r}: the source did not take back the destination's key pair ({exc})",
            hint=f"the destination keeps it: run 'guardfab vm migrate {name} --abort' again",
        ) from (cause or exc)


def abort(source: Agent, dest: Agent, name: str) -> dict[str, Any]:
    """Finish an interrupted migration by hand: the destination's pair back to the source."""
    pair = dest.call("POST", f"/vms/{name}/incoming/abort")
    answer: dict[str, Any] = source.call(
        "POST", f"/vms/{name}/outgoing/take-back", {"kp": pair["kp"], "vault": pair["vault"]}
    )
    return answer


__all__ = [
    "Agent",
    "HandBackError",
    "MigrationReport",
    "MovedWithErrorsError",
    "abort",
    "migrate",
    "take_back",
]
