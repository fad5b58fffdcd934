"""``hgs diagnose`` for an HGS whose state is in etcd: the cluster instead of ``state.db``.

What an operator needs to know, each with its fix: the client TLS files are there,
load, and the client certificate is not expiring; the password file is private;
every configured member answers (the one that does not is named); the cluster has
a leader and the members hgs.json names are the ones it has; it accepts the
transactions the HGS was told it accepts; the store opens. The trust state and the
audit chain are then checked as for SQLite, by :mod:`guardfab.hgs.diagnose`.

A member that does not answer while others do is a warning, not a failure: the
HGS keeps serving through the others (the store fails over), but the cluster now
survives one member fewer. No member answering, no leader, a TLS handshake that
fails, and a cluster that refuses the configured transaction size are failures:
the HGS cannot work, or will fail on its first big transaction.

Every request is a read: diagnose changes nothing, in etcd as on disk. The
password is read to log in and never shown.
"""

from __future__ import annotations

import datetime
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509

from guardfab import diagnostics as diag
from guardfab.diagnostics import Check
from guardfab.errors import GuardfabError
from guardfab.hgs.diagnose_certs import key_match, validity
from guardfab.hgs.etcd_admin import gateway_factory, open_settings_store
from guardfab.hgs.state import EtcdStoreSettings, HgsState
from guardfab.store.errors import StoreError
from guardfab.store.etcd import EtcdStore
from guardfab.store.etcd_cluster import (
    ClusterMember,
    GatewayFactory,
    MemberStatus,
    member_list,
    member_status,
    txn_ops_refusal,
)

#: Seconds each member gets to answer its status (a member that is down costs this).
PROBE_TIMEOUT = 2.0

FIX = {
    "files": "give hgs.json's store.{field} a file that exists on this node (copy it from the "
    "etcd CA's administrator); every HGS node needs its own copy",
    "renew": "issue a new etcd client certificate from the etcd CA, replace store.cert_file and "
    "store.key_file, and restart 'hgs serve'",
    "tls": "store.ca_file must be the CA that issued the members' certificates (etcd "
    "--cert-file); if the members require client certificates (--client-cert-auth), "
    "store.cert_file must be issued by their --trusted-ca-file",
    "member": "start etcd on that member (or correct its URL in hgs.json store.endpoints); the "
    "HGS is served by the others meanwhile, but the cluster now survives one failure fewer",
    "none": "start the etcd cluster (or correct hgs.json store.endpoints): 'hgs serve' does not "
    "start, and a running HGS answers 503, while no member answers",
    "leader": "a majority of the members must be up and reach each other on their peer URLs; "
    "read the members' logs",
    "endpoints": "name every member with --store-etcd (hgs.json store.endpoints) on every HGS "
    "node, so the HGS can fail over to each",
    "txn": "run every etcd member with --max-txn-ops {n} (512 is what ADR 0022 recommends), or "
    "set hgs.json store.max_txn_ops to the cluster's value",
    "store": "see the etcd-member checks above; check store.username and store.password_file",
}


class EtcdDiagnosis:
    """The etcd checks of one diagnose run; ``store`` is open afterwards if it opened."""

    def __init__(self, state: HgsState, now: datetime.datetime) -> None:
        self.state = state
        self.now = now
        self.store: EtcdStore | None = None

    def checks(self) -> Iterator[Check]:
        """Every etcd check, in order of dependence."""
        try:
            settings = self.state.etcd_settings()
        except GuardfabError as exc:
            yield diag.fail("etcd-config", str(exc), exc.hint or "fix hgs.json's store")
            return
        yield diag.ok(
            "etcd-config",
            f"state in etcd under prefix {settings.prefix!r}, "
            f"{len(settings.endpoints)} member(s) configured",
        )
        yield from _client_tls(settings, self.now)
        yield from _private_files(settings)
        try:
            connect = gateway_factory(settings, timeout=min(settings.timeout, PROBE_TIMEOUT))
        except GuardfabError as exc:
            yield diag.fail("etcd-password", str(exc), exc.hint or FIX["store"])
            return
        statuses = [member_status(connect, endpoint) for endpoint in settings.endpoints]
        yield from _members(statuses)
        answering = [s for s in statuses if s.answered]
        if not answering:
            yield diag.skip("etcd-cluster", "no member answered")
            return
        yield from _cluster(connect, answering, settings)
        yield _txn_ops(connect, answering, settings)
        yield self._open(settings)

    def _open(self, settings: EtcdStoreSettings) -> Check:
        try:
            self.store = open_settings_store(settings)
            revision = self.store.current_revision()
            count = self.store.stored_keys()
        except GuardfabError as exc:
            if self.store is not None:
                self.store.close()
                self.store = None
            return diag.fail("store", f"the etcd store does not open: {exc}", FIX["store"])
        return diag.ok(
            "store",
            f"etcd prefix {settings.prefix!r} opens: {count} key(s), cluster revision {revision}",
        )


def _client_tls(settings: EtcdStoreSettings, now: datetime.datetime) -> Iterator[Check]:
    files = {"ca_file": settings.ca_file, "cert_file": settings.cert_file}
    files["key_file"] = settings.key_file
    missing = [f for f, path in files.items() if path is not None and not Path(path).is_file()]
    for field in missing:
        yield diag.fail(
            f"etcd {field}", f"{files[field]} does not exist", FIX["files"].format(field=field)
        )
    if "ca_file" not in missing and settings.ca_file is not None:
        try:
            count = len(x509.load_pem_x509_certificates(Path(settings.ca_file).read_bytes()))
            yield diag.ok("etcd-ca", f"{settings.ca_file} holds {count} CA certificate(s)")
        except (OSError, ValueError) as exc:
            yield diag.fail(
                "etcd-ca", f"{settings.ca_file} is not PEM certificates ({exc})", FIX["tls"]
            )
    if settings.cert_file is None or "cert_file" in missing:
        return
    try:
        leaf = x509.load_pem_x509_certificates(Path(settings.cert_file).read_bytes())[0]
    except (OSError, ValueError) as exc:
        yield diag.fail("etcd-client-cert", f"{settings.cert_file} does not load ({exc})", "")
        return
    yield validity("etcd-client-cert", leaf, now, FIX["renew"])
    if settings.key_file is not None and "key_file" not in missing:
        yield key_match(
            "etcd-client-key",
            Path(settings.key_file),
            leaf,
            label=settings.key_file,
            cert=settings.cert_file,
        )


def _private_files(settings: EtcdStoreSettings) -> Iterator[Check]:
    """The password file and the client key are 0600 (only their modes are read)."""
    for field, value in (
        ("key_file", settings.key_file),
        ("password_file", settings.password_file),
    ):
        if value is None or not Path(value).is_file():
            if field == "password_file" and value is not None:
                yield diag.fail(
                    "etcd password_file",
                    f"{value} does not exist",
                    FIX["files"].format(field=field),
                )
            continue
        mode = stat.S_IMODE(Path(value).stat().st_mode)
        if mode & 0o077:
            yield diag.fail(
                f"mode {value}",
                f"mode {mode:04o}: the etcd {field} is readable or writable by group or others",
                f"chmod 600 {value} (and find out who could read it: a leaked etcd credential "
                "must be replaced)",
            )
        else:
            yield diag.ok(f"etcd {field}", f"{value} is 0600")


def _members(statuses: list[MemberStatus]) -> Iterator[Check]:
    some_answer = any(s.answered for s in statuses)
    for status in statuses:
        name = f"etcd-member {status.endpoint}"
        if status.answered:
            yield diag.ok(name, f"answers (etcd {status.version}, member {status.member_id:x})")
        elif status.tls_failure:
            yield diag.fail(name, f"TLS handshake failed: {status.error}", FIX["tls"])
        elif some_answer:
            yield diag.warn(name, f"does not answer: {status.error}", FIX["member"])
        else:
            yield diag.fail(name, f"does not answer: {status.error}", FIX["none"])


def _cluster(
    connect: GatewayFactory, answering: list[MemberStatus], settings: EtcdStoreSettings
) -> Iterator[Check]:
    """One cluster, one leader, and the members hgs.json names are the cluster's."""
    if len({s.cluster_id for s in answering}) > 1:
        yield diag.fail(
            "etcd-leader",
            "the configured members belong to different etcd clusters",
            "store.endpoints must all be members of one cluster",
        )
        return
    gateway = connect([s.endpoint for s in answering])
    try:
        members = member_list(gateway)
    except StoreError as exc:
        yield diag.fail("etcd-members", f"the member list does not read: {exc}", FIX["leader"])
        return
    finally:
        gateway.close()
    leaders = {s.leader for s in answering}
    if leaders == {0} or 0 in leaders:
        yield diag.fail("etcd-leader", "the cluster has no leader", FIX["leader"])
    elif len(leaders) > 1:
        yield diag.warn(
            "etcd-leader", "members name different leaders (an election?)", "run diagnose again"
        )
    else:
        silent = set(settings.endpoints) - {s.endpoint for s in answering}
        yield _leader(leaders.pop(), members, silent)
    yield _membership(members, settings)


def _leader(leader: int, members: list[ClusterMember], silent: set[str]) -> Check:
    """The leader the members name; a warning if it is a configured member that is silent.

    Members go on naming a leader that died until the election timeout ends.
    """
    member = next((m for m in members if m.member_id == leader), None)
    if member is None:
        return diag.ok("etcd-leader", f"the leader is member {leader:x}")
    name = f"{member.name} ({', '.join(member.client_urls)})"
    if silent.intersection(member.client_urls):
        return diag.warn(
            "etcd-leader",
            f"the members still name {name} as leader, which does not answer: an election is due",
            "run diagnose again in a few seconds; if no leader follows, " + FIX["leader"],
        )
    return diag.ok("etcd-leader", f"the leader is {name}")


def _membership(members: list[ClusterMember], settings: EtcdStoreSettings) -> Check:
    configured = set(settings.endpoints)
    unnamed = [m for m in members if not configured.intersection(m.client_urls)]
    advertised = {url for m in members for url in m.client_urls}
    unknown = sorted(configured - advertised)
    counts = f"the cluster reports {len(members)} member(s); hgs.json names {len(configured)}"
    if unnamed:
        others = ", ".join(f"{m.name} ({', '.join(m.client_urls)})" for m in unnamed)
        return diag.warn(
            "etcd-members", f"{counts}: the HGS cannot fail over to {others}", FIX["endpoints"]
        )
    if unknown:
        return diag.warn(
            "etcd-members",
            f"{counts}: no member advertises {', '.join(unknown)}",
            "use the members' advertised client URLs in store.endpoints "
            "(etcdctl member list shows them)",
        )
    return diag.ok("etcd-members", f"{counts}, each of them")


def _txn_ops(
    connect: GatewayFactory, answering: list[MemberStatus], settings: EtcdStoreSettings
) -> Check:
    gateway = connect([s.endpoint for s in answering])
    try:
        refusal = txn_ops_refusal(gateway, settings.prefix.encode("ascii"), settings.max_txn_ops)
    except StoreError as exc:
        return diag.fail("etcd-max-txn-ops", f"the probe transaction failed: {exc}", FIX["store"])
    finally:
        gateway.close()
    if refusal is not None:
        return diag.fail(
            "etcd-max-txn-ops",
            f"hgs.json store.max_txn_ops is {settings.max_txn_ops}, but the cluster refuses a "
            f"transaction that big ({refusal})",
            FIX["txn"].format(n=settings.max_txn_ops),
        )
    return diag.ok(
        "etcd-max-txn-ops",
        f"the cluster accepts transactions of {settings.max_txn_ops} operations",
    )
