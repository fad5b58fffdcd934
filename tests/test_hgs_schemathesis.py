"""A bounded fuzz of the whole HGS API from its own OpenAPI document (schemathesis).

Every operation the served HGS documents gets a handful of generated requests
(valid and schema-violating bodies, paths and queries) with the admin token,
over real HTTPS. Properties: no request makes the service fail (5xx), and a
request the service refuses (4xx) leaves the store exactly as it was (its
store-wide revision, which every write moves, and the audit head).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from guardfab.hgs.app import create_app
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.store.memory import MemoryStore
from hgs_harness import RunningHgs
from test_hgs_admin_fixtures import Probe, module_hgs, probe, tokens_of

__all__ = ["module_hgs", "probe"]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hgs-schemathesis")]

#: Examples per operation and mode (derandomized, so every run sends the same
#: ones): the whole fuzz takes 10-20 s. Hypothesis is driven here rather than
#: through schemathesis's pytest integration, whose items pytest-xdist does not run.
EXAMPLES = 8
#: Host-facing routes whose refusals are deliberately written to the audit log.
AUDITED_REFUSALS = {
    ("POST", "/keyprotection/v1/release"),
    ("POST", "/keyprotection/v1/shielding-data/open"),
    ("POST", "/attestation/v1/attest"),
}


def _openapi_document() -> dict[str, Any]:
    """The document the HGS code serves, built in-process so tests are known at collection
    (``test_the_served_document_is_the_one_fuzzed`` checks the running one is the same).
    """
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "hgs"
        init_state(directory, HgsConfig(service_name="test-hgs"))
        document: dict[str, Any] = create_app(
            HgsService(HgsState(directory), MemoryStore())
        ).openapi()
    return document


DOCUMENT = _openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def session(module_hgs: RunningHgs) -> Iterator[Any]:
    """A requests session verifying the HGS CA (what schemathesis sends with)."""
    import requests  # noqa: PLC0415 - schemathesis's own transport

    with requests.Session() as found:
        found.verify = module_hgs.ca
        yield found


#: Every operation the document describes, by label ("POST /admin/v1/baselines").
OPERATIONS = {
    f"{op.method.upper()} {op.path}": op
    for op in (result.ok() for result in schema.get_all_operations())
}


_CONSTRAINTS = ("pattern", "enum", "minimum", "maximum", "maxLength", "minLength", "format")


def _constrained(schema: dict[str, Any]) -> bool:
    if any(key in schema for key in _CONSTRAINTS) or schema.get("type") not in (None, "string"):
        return True
    return any(_constrained(s) for s in schema.get("anyOf", []) if s.get("type") != "null")


def _has_inputs(label: str) -> bool:
    """Whether a request can violate the schema: a body, or a constrained path/query value."""
    operation = OPERATIONS[label]
    return bool(operation.body) or any(
        parameter.location.value in ("path", "query")
        and _constrained(parameter.definition.get("schema", {}))
        for parameter in operation.iter_parameters()
    )


#: Schema-violating requests only where the schema can be violated.
CASES = [(label, "positive") for label in OPERATIONS] + [
    (label, "negative") for label in OPERATIONS if _has_inputs(label)
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{m} {label}" for label, m in CASES])
def test_no_5xx_and_refusals_change_nothing(
    label: str, mode: str, module_hgs: RunningHgs, probe: Probe, session: Any
) -> None:
    token = tokens_of(module_hgs)[0]
    strategy = OPERATIONS[label].as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        _check_one(case, module_hgs, probe, session, token)

    check()


def _check_one(case: Any, hgs: RunningHgs, probe: Probe, session: Any, token: str) -> None:
    before = (probe.revision(), probe.audit_seq())
    response = case.call(
        base_url=hgs.url,
        session=session,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        verify=hgs.ca,
    )
    where = (case.method, case.path, response.status_code, response.text[:300])
    assert response.status_code < 500, where
    assert token not in response.text
    if 400 <= response.status_code < 500:
        after = (probe.revision(), probe.audit_seq())
        if (case.method, case.path) in AUDITED_REFUSALS and after != before:
            # The refusal itself is recorded, in one transaction, and nothing else.
            assert after == (before[0] + 1, before[1] + 1), where
            assert probe.last_audit()["outcome"] != "success", where
        else:
            assert after == before, where


def test_the_document_describes_every_admin_body(module_hgs: RunningHgs) -> None:
    with module_hgs.client() as client:
        spec = client.get("/openapi.json").json()
    posts = [
        op
        for path, ops in spec["paths"].items()
        if path.startswith("/admin/v1")
        for method, op in ops.items()
        if method in ("post", "put", "patch")
    ]
    bodies = [op for op in posts if "requestBody" in op]
    assert len(bodies) >= 15
    for op in bodies:
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        component = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        assert component.get("additionalProperties") is False, ref


def test_the_served_document_is_the_one_fuzzed(module_hgs: RunningHgs) -> None:
    with module_hgs.client() as client:
        assert client.get("/openapi.json").json() == DOCUMENT
