"""The state behind the HGS: one store interface, local backends, the audit log.

Import the interface and the backends from here; see ``docs/adr/0004-state-store.md``
for why the interface looks like etcd's.
"""

from guardfab.store.audit import AuditLog, verify
from guardfab.store.audit_chain import AuditCheckpoint, AuditHead, AuditRecord, AuditReport
from guardfab.store.base import (
    ABSENT,
    ANY,
    Condition,
    Entry,
    EventKind,
    Expect,
    Store,
    Txn,
    Watch,
    WatchEvent,
)
from guardfab.store.errors import (
    AuditChainError,
    ConflictError,
    StoreError,
    StoreSchemaError,
    StoreStateError,
    StoreUsageError,
    WatchCompactedError,
)
from guardfab.store.etcd import EtcdStore
from guardfab.store.memory import MemoryStore
from guardfab.store.sqlite import SqliteStore

__all__ = [
    "ABSENT",
    "ANY",
    "AuditChainError",
    "AuditCheckpoint",
    "AuditHead",
    "AuditLog",
    "AuditRecord",
    "AuditReport",
    "Condition",
    "ConflictError",
    "Entry",
    "EtcdStore",
    "EventKind",
    "Expect",
    "MemoryStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreSchemaError",
    "StoreStateError",
    "StoreUsageError",
    "Txn",
    "Watch",
    "WatchCompactedError",
    "WatchEvent",
    "verify",
]
