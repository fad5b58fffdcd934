"""The store a serving HGS opens: a host's last record is not copied into the watch history.

A TPM host's last record (its boot log) is ~20 KB, rewritten at every
attestation; in the watch history it was written twice, kept 10,000 revisions
and pruned again (bench/README.md, round 7). Everything else keeps its value.
"""

from __future__ import annotations

from pathlib import Path

from guardfab.hgs import registry as reg
from guardfab.hgs.server import open_store
from guardfab.hgs.state import HgsConfig, HgsState, init_state


def test_the_served_store_keeps_last_records_out_of_the_history(tmp_path: Path) -> None:
    init_state(tmp_path / "hgs", HgsConfig(service_name="test-hgs"))
    store = open_store(HgsState(tmp_path / "hgs"))
    try:
        start = store.current_revision() + 1
        watch = store.watch("", start_revision=start)
        store.put(reg.LAST + "host-a", b'{"result": {}}')
        store.put(reg.REVOKED + "host-b", b'{"host_id": "host-b"}')
        events = [watch.next_event(timeout=5) for _ in range(2)]
        watch.cancel()
    finally:
        store.close()
    assert [(e.key, e.value) for e in events if e is not None] == [
        (reg.LAST + "host-a", None),
        (reg.REVOKED + "host-b", b'{"host_id": "host-b"}'),
    ]
