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
from hypothesis import HealthCheck, settings

from guardfab.hgs.app import create_app
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.store.memory import MemoryStore
from hgs_harness import RunningHgs
from test_hgs_admin_fixtures import Probe, module_hgs, probe, tokens_of

__all__ = ["module_hgs", "probe"]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hgs-schemathesis")]

#: Examples per operation (valid and schema-violating; derandomized, so every run
#: sends the same ones): the whole fuzz stays near 20 s.
EXAMPLES = 6
#: Host-facing routes whose refusals are deliberately written to the audit log.
AUDITED_REFUSALS = {("POST", "/keyprotection/v1/release"), ("POST", "/attestation/v1/attest")}


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


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_refusals_change_nothing(
    case: Any, module_hgs: RunningHgs, probe: Probe, session: Any
) -> None:
    before = (probe.revision(), probe.audit_seq())
    token = tokens_of(module_hgs)[0]
    response = case.call(
        base_url=module_hgs.url,
        session=session,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        verify=module_hgs.ca,
    )
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    assert token not in response.text
    if 400 <= response.status_code < 500:
        after = (probe.revision(), probe.audit_seq())
        where = (case.method, case.path, response.status_code, response.text[:300])
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
