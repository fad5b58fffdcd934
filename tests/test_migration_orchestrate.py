"""The CLI's side of a migration, against in-memory agents (logic only).

The real thing -- two agents over HTTPS, a booted guest -- is tests/test_vm_migrate.py;
here, the order of the calls and what happens on each failure: a refusal ends it
with nothing to hand back; a failure after the destination's release hands its
pair to the source; a hand-back that cannot happen says what to do by hand; a
failure after the hand-over does not undo the migration but is not silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from guardfab.errors import GuardfabError, NotAuthorizedError, TransportError, UsageError
from guardfab.host.manage import orchestrate

PAIR = {"name": "vm1", "kp": "S1A", "vault": "S1B"}
ENDPOINT = {"name": "vm1", "address": "0.0.0.0", "port": 4444, "salt": "c2FsdA"}
STATS = {"name": "vm1", "total_time_ms": 900, "downtime_ms": 50, "transferred_bytes": 7}


@dataclass
class FakeAgent:
    """Answers by path; an exception in ``answers`` is raised instead."""

    url: str
    answers: dict[str, Any]
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        step = path.removeprefix("/vms/vm1/")
        self.calls.append((step, body))
        answer = self.answers.get(step, {"name": "vm1"})
        if isinstance(answer, Exception):
            raise answer
        return answer


def _agents(**failures: Exception) -> tuple[FakeAgent, FakeAgent]:
    source = FakeAgent("https://10.0.0.1:7445", {
        "outgoing": {"record": {}, "pairs": [], "disks_dir": "/shared/vm1"},
        "outgoing/send": STATS,
        "outgoing/take-back": {"name": "vm1", "pending_pair": 3, "resumed": False},
    })  # fmt: skip
    dest = FakeAgent("https://10.0.0.2:7445", {
        "incoming": ENDPOINT,
        "incoming/finish": {"name": "vm1", "pid": 42, "destination": "/vms/vm1"},
        "incoming/abort": PAIR,
    })  # fmt: skip
    for step, error in failures.items():
        agent = dest if step.startswith("incoming") else source
        agent.answers[step.replace("_", "/").replace("take/back", "take-back")] = error
    return source, dest


def _steps(agent: FakeAgent) -> list[str]:
    return [step for step, _ in agent.calls]


def test_the_order_and_a_wildcard_address_becomes_the_destinations_host() -> None:
    source, dest = _agents()
    report = orchestrate.migrate(source, dest, "vm1", port=4444)
    assert _steps(source) == ["outgoing", "outgoing/send", "outgoing/leave"]
    assert _steps(dest) == ["incoming", "incoming/finish", "incoming/forward"]
    assert source.calls[1][1] == {"address": "10.0.0.2", "port": 4444, "salt": "c2FsdA"}
    assert dest.calls[0][1]["port"] == 4444
    assert (report.pid, report.downtime_ms, report.warnings) == (42, 50, [])


def test_a_refusal_at_the_destination_hands_nothing_back() -> None:
    source, dest = _agents(incoming=NotAuthorizedError("got no keys"))
    with pytest.raises(NotAuthorizedError, match="got no keys"):
        orchestrate.migrate(source, dest, "vm1")
    assert _steps(source) == ["outgoing"]
    assert _steps(dest) == ["incoming"]


@pytest.mark.parametrize(
    "failure",
    [
        {"outgoing_send": TransportError("handshake failed")},
        {"incoming_finish": TransportError("vTPM state refused")},
        {"incoming": TransportError("QEMU did not start")},
    ],
)
def test_a_failure_after_the_release_hands_the_pair_back(failure: dict[str, Exception]) -> None:
    source, dest = _agents(**failure)
    with pytest.raises(TransportError):
        orchestrate.migrate(source, dest, "vm1")
    assert _steps(dest)[-1] == "incoming/abort"
    assert _steps(source)[-1] == "outgoing/take-back"
    assert source.calls[-1][1] == {"kp": "S1A", "vault": "S1B"}  # the name stays behind
    assert "outgoing/leave" not in _steps(source)


def test_a_destination_that_released_nothing_has_nothing_to_hand_back() -> None:
    source, dest = _agents(outgoing_send=TransportError("x"), incoming_abort=UsageError("none"))
    with pytest.raises(TransportError, match="x"):
        orchestrate.migrate(source, dest, "vm1")
    assert "outgoing/take-back" not in _steps(source)


def test_a_hand_back_that_cannot_happen_says_what_to_do() -> None:
    source, dest = _agents(outgoing_send=TransportError("x"), incoming_abort=TransportError("down"))
    with pytest.raises(orchestrate.HandBackError, match="did not answer its key pair") as caught:
        orchestrate.migrate(source, dest, "vm1")
    assert "--abort" in (caught.value.hint or "")
    source, dest = _agents(
        outgoing_send=TransportError("x"), outgoing_take_back=GuardfabError("no")
    )
    with pytest.raises(orchestrate.HandBackError, match="did not take back"):
        orchestrate.migrate(source, dest, "vm1")


def test_a_failure_after_the_hand_over_is_reported_not_undone() -> None:
    source, dest = _agents(incoming_forward=TransportError("port taken"))
    report = orchestrate.migrate(source, dest, "vm1")
    assert report.pid == 42
    assert len(report.warnings) == 1
    assert "runs at https://10.0.0.2:7445" in report.warnings[0]
    assert "port taken" in report.warnings[0]
    assert "incoming/abort" not in _steps(dest)
