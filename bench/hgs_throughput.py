"""How many attestations per second does a real HGS serve over HTTPS, and how fast?

Starts its own HGS (``guardfab hgs init`` in a temporary directory, ``guardfab hgs
serve --workers 2`` on a free 127.0.0.1 port), registers software hosts straight in
its store (TPM hosts with pre-bound AKs, the bench boot log's baseline and CI
policy; host-key hosts; modes tpm + host-key both active), then measures:

* the ceiling: ``GET /healthz`` driven by ``wrk`` (Debian; installed if missing);
* TPM mode (100-event log, quote over 11 PCRs) and host-key mode, each attestation
  being ``POST /attestation/v1/challenge`` + ``POST /attestation/v1/attest`` with
  evidence bound to that fresh nonce: at maximum load (closed loop, every
  connection back to back) and at half that rate (open loop: attestations start on
  a fixed schedule, latency counted from the scheduled start).

wrk cannot attest honestly (each attest body must carry a signature over the
nonce just issued), so attestations come from a Python load generator: several
processes, each an asyncio loop over keep-alive TLS connections speaking minimal
HTTP/1.1, signing each quote with the software AK (or the JWS with the host key)
per nonce. The CPU seconds of the generator and of the HGS (supervisor + uvicorn
workers, from /proc) are printed beside each result, so a reader can see who was
the bottleneck: on this 2-core machine both share the same cores.

``--mode release`` measures key releases instead (issue 4, ``POST
/keyprotection/v1/release``): host-key hosts attest once for a health
certificate, each connection drives one VM's KP chain (every release re-keys, so
the next request sends the previous answer's egress KP), and a sample of the
answers is unwrapped with the host key and checked (see ``_release.py``).

Usage: ``.venv/bin/python bench/hgs_throughput.py [--duration 10] [--clients 2]``.
All traffic goes to 127.0.0.1; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import multiprocessing
import re
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import _common as c
import _release
import uvloop
from joserfc.jwk import ECKey

from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.trust import AttestationMode, HostKey
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.hgs import registry as reg
from guardfab.host.attestation import as_signer, host_key_evidence
from test_attestation_fixtures import NONCE, host_key_jwk
from test_tpm_quote import soft_sign

HOSTS = 8
WORKERS = 2
GOALS = {"tpm": 1000.0, "host-key": 2000.0, "release": 1000.0}
P99_GOAL_MS = 50.0
WARMUP = 1.5
#: Nonce lifetime the bench's HGS is given (see --nonce-ttl) and the expiry sweep's
#: period (hgs.app.COMPACT_INTERVAL): the warm-up outlasts both.
NONCE_TTL = 5
SWEEP_SLACK = 1.0
BOOT = c.BenchBoot()


# ------------------------------------------------------------------ hosts and evidence


@dataclass
class Material:
    """Per-host state a generator needs to build evidence for any nonce."""

    tpm: list[Callable[[bytes, str], bytes]] = field(default_factory=list)
    host_key: list[Callable[[bytes, str], bytes]] = field(default_factory=list)
    puts: list[tuple[str, Any]] = field(default_factory=list)
    release: list[_release.ReleaseHost] = field(default_factory=list)


def _tpm_body_maker(host: c.BenchHost) -> Callable[[bytes, str], bytes]:
    """Request bodies for ``host``: the quote re-made and re-signed for each nonce."""
    evidence = host.evidence(NONCE, quoted=c.QUOTED_PCRS)
    host_key = dict(evidence.host_key)
    marker = quote_qualifying_data(NONCE, host_key)
    prefix, suffix = evidence.quote_attest.split(marker)
    template = evidence.to_dict()

    def body(nonce: bytes, token: str) -> bytes:
        attest = prefix + quote_qualifying_data(nonce, host_key) + suffix
        quote = {
            "attest": b64url_encode(attest),
            "signature": b64url_encode(soft_sign(host.ak, attest)),
        }
        return json.dumps({"nonce": token, "evidence": {**template, "quote": quote}}).encode()

    return body


def _host_key_body_maker(signing: ECKey, host_key: dict[str, Any]) -> Callable[[bytes, str], bytes]:
    # The host agent keeps its signer; made per nonce it cost the generator a JWK
    # import and a thumbprint per attestation, CPU taken from the HGS's cores.
    signer = as_signer(signing)

    def body(nonce: bytes, token: str) -> bytes:
        evidence = host_key_evidence(signer, nonce=nonce, host_key=host_key)
        return json.dumps({"nonce": token, "evidence": evidence.to_dict()}).encode()

    return body


def make_material(ak_kind: str) -> Material:
    """HOSTS TPM hosts and HOSTS host-key hosts, and the store records that trust them."""
    material = Material()
    log = BOOT.log_bytes()
    baseline = c.bench_trust([], log).baselines[0]
    material.puts += [
        (reg.MODES_KEY, [AttestationMode.TPM.value, AttestationMode.HOST_KEY.value]),
        (reg.BASELINES + baseline.name, baseline.to_dict()),
        (reg.CI_POLICIES + c.CI_POLICY.digest.hex(), c.CI_POLICY.to_dict()),
    ]
    for n in range(HOSTS):
        host = c.BenchHost(
            host_id=f"tpm-{n}", index=n, ek_kind="p256-sha256-128", ak_kind=ak_kind, boot=BOOT
        )
        material.tpm.append(_tpm_body_maker(host))
        material.puts += [
            (reg.TPM_HOSTS + host.host_id, host.registration().to_dict()),
            (reg.AK_BINDINGS + host.ak_name.hex(), host.binding().to_dict()),
        ]
        signing = ECKey.generate_key("P-256")
        key = HostKey(jose.thumbprint(signing), f"hk-{n}", jose.public_jwk(signing))
        material.host_key.append(_host_key_body_maker(signing, host_key_jwk(100 + n)))
        material.puts.append((reg.HOST_KEYS + key.key_id, key.to_dict()))
    material.release = _release.make_hosts(HOSTS)
    material.puts += [host.registration() for host in material.release]
    return material


#: Built before the generator processes fork, so they share the hosts' keys.
MATERIAL: Material | None = None
#: Release mode: attested hosts, tenant and KPS guardian (also built before the fork).
FABRIC: _release.Fabric | None = None


# ------------------------------------------------------------------ the load generator


async def attest_once(conn: c.Connection, make_body: Callable[[bytes, str], bytes]) -> str | None:
    """Challenge + attest; None on a health certificate, else what went wrong."""
    status, body = await conn.request("POST", "/attestation/v1/challenge")
    if status != 200:
        return f"challenge {status}: {body[:200]!r}"
    token = json.loads(body)["nonce"]
    status, body = await conn.request(
        "POST", "/attestation/v1/attest", make_body(b64url_decode(token, what="nonce"), token)
    )
    if status != 200 or b'"status":"Passed"' not in body:
        return f"attest {status}: {body[:300]!r}"
    return None


@dataclass
class Plan:
    """What one generator process does."""

    port: int
    ca: str
    mode: str
    start: float  # wall clock (time.time) at which measuring starts; warm-up before it
    end: float
    connections: int
    rate: float | None  # attestations/s for this process (open loop); None: closed loop
    index: int  # this process's number among ``clients``
    clients: int
    stagger: float = 0.02  # seconds between two connection opens (all processes)
    max_open: int = 32  # open loop: connections per process at most


@dataclass
class Tally:
    """What a generator process measured inside [start, end]."""

    done: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    worst: tuple[float, float] = (0.0, 0.0)  # the slowest attestation: latency, start time
    checked: int = 0  # release mode: answers unwrapped and checked with the host key
    lag: float = 0.0  # the generator's own worst event-loop lag inside [start, end], seconds
    opened: int = 0  # connections opened inside [start, end] (open loop: replacements only)

    def add(self, latency: float, error: str | None, started: float) -> None:
        self.worst = max(self.worst, (latency, started))
        if error is None:
            self.done += 1
            self.latencies.append(latency)
        else:
            self.errors += 1
            self.first_error = self.first_error or error


def _makers(plan: Plan) -> list[Callable[[bytes, str], bytes]]:
    assert MATERIAL is not None
    makers = MATERIAL.tpm if plan.mode == "tpm" else MATERIAL.host_key
    first = plan.index * HOSTS // plan.clients
    return makers[first:] + makers[:first]


@dataclass
class Session:
    """One keep-alive connection and, in release mode, the VM whose KP chain it drives."""

    conn: c.Connection
    vm: _release.Vm | None = None


async def open_session(plan: Plan, context: ssl.SSLContext, n: int) -> Session:
    """A new connection (and a new VM with a fresh KP in release mode)."""
    conn = await c.Connection.open(plan.port, context)
    if plan.mode != "release":
        return Session(conn)
    assert FABRIC is not None
    host = FABRIC.hosts[(n * plan.clients + plan.index) % len(FABRIC.hosts)]
    return Session(conn, _release.Vm(FABRIC, host))


async def run_once(
    session: Session, makers: list[Callable[[bytes, str], bytes]], n: int
) -> tuple[str | None, float]:
    """One attestation or release; (what went wrong or None, when the answer arrived)."""
    if session.vm is None:
        error = await attest_once(session.conn, makers[n % len(makers)])
        return error, time.time()
    error, arrived = await _release.release_once(session.conn, session.vm)
    if error is not None:  # the chain may be broken (a refused KP): start a new VM
        assert FABRIC is not None
        session.vm = _release.Vm(FABRIC, session.vm.host)
    return error, arrived


#: What a broken or server-closed connection raises (it is then replaced).
_LOST = (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError)
#: uvicorn closes a keep-alive connection idle for 5 s; reuse only younger ones.
_IDLE_LIMIT = 3.0


async def closed_loop(plan: Plan, tally: Tally) -> None:
    """Every connection attests back to back until the end."""
    context = ssl.create_default_context(cafile=plan.ca)
    makers = _makers(plan)

    async def run(n: int) -> None:
        # Staggered opens: a burst of connects would all be accepted by one worker.
        await asyncio.sleep(plan.stagger * (n * plan.clients + plan.index))
        session = None
        while (now := time.time()) < plan.end:
            try:
                session = session or await open_session(plan, context, n)
                error, done = await run_once(session, makers, n)
            except _LOST as exc:
                error, session = f"connection lost: {type(exc).__name__}: {exc}", None
                done = time.time()
                await asyncio.sleep(0.05)  # no busy loop against a server that is gone
            if now >= plan.start:
                tally.add(done - now, error, now)
        if session is not None:
            session.conn.close()

    await asyncio.gather(*(run(n) for n in range(plan.connections)))


class Warm:
    """The open loop's connections, opened before the schedule starts and used in turn.

    First in, first out: with ``max_open`` connections each is used every
    ``max_open / rate`` seconds, so none goes idle long enough to be closed, and none
    is opened while measuring unless the server closed it. Opening them on demand
    (round 5 and before) turned any hiccup into a burst of TLS handshakes and new
    KPs on both sides, which queued the next attestations behind them
    (bench/README.md, round 6).
    """

    def __init__(self, plan: Plan, tally: Tally) -> None:
        self.plan, self.tally = plan, tally
        self.context = ssl.create_default_context(cafile=plan.ca)
        self.idle: collections.deque[tuple[Session, float]] = collections.deque()

    async def open_all(self) -> None:
        for n in range(self.plan.max_open):
            self.idle.append((await open_session(self.plan, self.context, n), time.time()))

    async def take(self, n: int) -> Session:
        """The connection idle longest (a new one if none is left young enough)."""
        while self.idle:
            session, used = self.idle.popleft()
            if time.time() - used < _IDLE_LIMIT:
                return session
            session.conn.close()
        if time.time() >= self.plan.start:
            self.tally.opened += 1
        return await open_session(self.plan, self.context, n)

    def give_back(self, session: Session) -> None:
        self.idle.append((session, time.time()))

    def close(self) -> None:
        for session, _used in self.idle:
            session.conn.close()


async def open_loop(plan: Plan, tally: Tally) -> None:
    """Attestations start every 1/rate s whether or not earlier ones finished."""
    assert plan.rate is not None
    makers = _makers(plan)
    warm = Warm(plan, tally)
    await warm.open_all()
    tasks: set[asyncio.Task[None]] = set()
    # At most this many connections: a stall must queue attestations (their latency
    # still counts from the schedule), not set off a storm of new TLS handshakes.
    slots = asyncio.Semaphore(plan.max_open)

    async def one(n: int, scheduled: float) -> None:
        async with slots:
            try:
                session = await warm.take(n)
                error, done = await run_once(session, makers, n)
                warm.give_back(session)
            except _LOST as exc:
                error, done = f"connection lost: {type(exc).__name__}: {exc}", time.time()
        if scheduled >= plan.start:
            tally.add(done - scheduled, error, scheduled)

    begin, n = time.time(), 0
    while (scheduled := begin + n / plan.rate) < plan.end:
        await asyncio.sleep(max(0.0, scheduled - time.time()))
        task = asyncio.create_task(one(n, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    warm.close()


#: How often the generator checks its own event loop for lag.
_LAG_TICK = 0.005


async def watch_lag(plan: Plan, tally: Tally) -> None:
    """Record the generator's worst event-loop lag while measuring.

    Latency is counted from the schedule, so a generator that falls behind shows up
    as server latency; this column tells the two apart.
    """
    while time.time() < plan.end:
        asked = time.perf_counter()
        await asyncio.sleep(_LAG_TICK)
        late = time.perf_counter() - asked - _LAG_TICK
        if time.time() >= plan.start:
            tally.lag = max(tally.lag, late)


async def drive(plan: Plan, tally: Tally) -> None:
    """The plan's loop, with the lag watch beside it."""
    run = closed_loop if plan.rate is None else open_loop
    watch = asyncio.create_task(watch_lag(plan, tally))
    try:
        await run(plan, tally)
    finally:
        watch.cancel()


def generator(plan: Plan) -> Tally:
    """Body of one generator process: run the plan, report its tally and its CPU."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate()
    # The forked heap (hosts, fabric, modules) lives until exit: keep it out of full
    # collections, which would otherwise pause this loop (65 ms seen).
    gc.freeze()
    tally = Tally()
    before = resource.getrusage(resource.RUSAGE_SELF)
    checked = _release.CHECKED[0]
    # The HGS serves on uvloop; so does its load, so that the generator's event
    # loop takes no more of the shared cores than it must.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(asyncio.wait_for(drive(plan, tally), timeout=plan.end - time.time() + 40))
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        tally.errors += 1
        tally.first_error = tally.first_error or f"{type(exc).__name__}: {exc}"
    tally.checked = _release.CHECKED[0] - checked
    after = resource.getrusage(resource.RUSAGE_SELF)
    tally.cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return tally


# ------------------------------------------------------------------ phases


@dataclass
class Result:
    """One measured phase."""

    name: str
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    server_cpu: float
    load_cpu: float
    seconds: float
    split: str
    other_cpu: float = 0.0
    note: str = ""
    first_error: str = ""
    checked: int = 0
    load_lag_ms: float | None = None
    opened: int = 0

    def row(self) -> list[str]:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        cores = f"{self.server_cpu:.1f} s ({self.server_cpu / self.seconds:.2f}) {self.split}"
        load = f"{self.load_cpu:.1f} s ({self.load_cpu / self.seconds:.2f})"
        rate = f"{self.rate:,.0f}"
        # HGS CPU per operation: average cores over the phase / rate. Unlike the rate,
        # it barely moves with what the other processes on the machine are doing.
        # Two decimals: one is 5-8 % of a value, coarser than the changes it judges.
        per_op = self.server_cpu / self.seconds * 1e3 / self.rate if self.rate else None
        per_op_text = "-" if per_op is None else f"{per_op:.2f}"
        return [
            self.name, rate, ms(self.p50_ms), ms(self.p99_ms), self.note or "-",
            str(self.errors), cores, per_op_text, load,
            "-" if self.load_lag_ms is None else f"{self.load_lag_ms:.0f}",
            f"{self.other_cpu / self.seconds:.2f}",
        ]  # fmt: skip


def attest_phase(
    hgs: c.Hgs, args: argparse.Namespace, mode: str, rate: float | None, name: str
) -> Result:
    """Run the generator processes for one phase; merge their tallies."""
    start = time.time() + args.warmup
    end = start + args.duration
    plans = [
        Plan(
            hgs.port, str(hgs.ca), mode, start, end, args.connections,
            None if rate is None else rate / args.clients, index=n, clients=args.clients,
            stagger=args.stagger,
        )
        for n in range(args.clients)
    ]  # fmt: skip
    before, busy, began = hgs.cpu(), c.machine_busy_seconds(), time.time()
    with multiprocessing.get_context("fork").Pool(args.clients) as pool:
        tallies = pool.map_async(generator, plans).get(timeout=args.duration + args.warmup + 90)
    elapsed = time.time() - began
    latencies = sorted(x for t in tallies for x in t.latencies)
    done = sum(t.done for t in tallies)
    p50 = statistics.median(latencies) * 1e3 if latencies else None
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies else None
    server_cpu, split = hgs.used_since(before)
    load_cpu = sum(t.cpu for t in tallies)
    worst, when = max(t.worst for t in tallies)
    return Result(
        name, done / args.duration, p50, p99, sum(t.errors for t in tallies),
        server_cpu, load_cpu, elapsed, split,
        note=f"{worst * 1e3:,.0f} ms at +{when - start:.1f} s" if worst else "",
        other_cpu=max(0.0, c.machine_busy_seconds() - busy - server_cpu - load_cpu),
        first_error=next((t.first_error for t in tallies if t.first_error), ""),
        checked=sum(t.checked for t in tallies),
        load_lag_ms=max(t.lag for t in tallies) * 1e3,
        opened=sum(t.opened for t in tallies),
    )  # fmt: skip


def healthz_phase(hgs: c.Hgs, args: argparse.Namespace) -> Result:
    """wrk on GET /healthz: the server's trivial-request ceiling over TLS."""
    url = f"https://127.0.0.1:{hgs.port}/healthz"
    command = ["wrk", "-t2", "-c64", f"-d{args.duration:g}s", "--latency", url]
    # wrk's CPU: the growth of RUSAGE_CHILDREN while it runs (no other child ends meanwhile).
    children_before, before, began = _children_cpu(), hgs.cpu(), time.time()
    busy = c.machine_busy_seconds()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = process.communicate(timeout=args.duration + 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    elapsed = time.time() - began
    wrk_cpu = _children_cpu() - children_before
    server_cpu, split = hgs.used_since(before)
    text = out.decode(errors="replace")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rate is None:
        raise RuntimeError(f"wrk printed no rate: {text[-500:]}")
    p50, p99 = (_wrk_ms(text, pct) for pct in ("50%", "99%"))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    slowest = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text)
    return Result(
        "healthz (wrk -t2 -c64, requests/s)", float(rate.group(1)), p50, p99,
        int(errors.group(1)) if errors else 0, server_cpu, wrk_cpu, elapsed, split,
        note=slowest.group(1) if slowest else "",
        other_cpu=max(0.0, c.machine_busy_seconds() - busy - server_cpu - wrk_cpu),
    )  # fmt: skip


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wrk_ms(text: str, pct: str) -> float | None:
    match = re.search(rf"{pct}\s+([\d.]+)(us|ms|s)\b", text)
    if match is None:
        return None
    return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]


# ------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["attest", "release"], default="attest")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--connections", type=int, default=8, help="connections per process")
    parser.add_argument("--ak", choices=["ecc", "rsa"], default="ecc", help="the TPM hosts' AK")
    parser.add_argument("--workers", type=int, default=WORKERS, help="HGS worker processes")
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.02,
        help="seconds between two connection opens (0: all at once, a reconnect storm)",
    )
    parser.add_argument(
        "--nonce-ttl",
        type=int,
        default=NONCE_TTL,
        help="seconds a challenge lives (hgs.json nonce_ttl, 5 s at least; the HGS's default is"
        " 120): each phase warms up for longer than this, so consumed nonces expire, and are"
        " swept, inside every measured window as at steady state",
    )
    parser.add_argument(
        "--etcd",
        type=int,
        default=0,
        metavar="MEMBERS",
        help="keep the HGS's state in a local etcd cluster of this many members (0: SQLite);"
        " their CPU counts as the HGS's",
    )
    parser.add_argument(
        "--phases",
        help="comma-separated subset to run (default: healthz,tpm,host-key; release mode: release)",
    )
    args = parser.parse_args()
    default = "release" if args.mode == "release" else "healthz,tpm,host-key"
    args.phases = set((args.phases or default).split(","))
    # At steady state as many consumed nonces expire per second as are issued, whatever
    # their TTL; a phase shorter than the TTL would measure attestations without that
    # expiry (round 7: a host-key phase run alone, nothing expiring, read 30 % faster
    # than the same phase run after the TPM phases, whose nonces expired during it).
    args.warmup = max(WARMUP, args.nonce_ttl + 2 * SWEEP_SLACK)
    return args


#: Phases measured at max then half load: (mode, label).
LOADED_PHASES = (("tpm", "TPM"), ("host-key", "host-key"), ("release", "release"))


def run(args: argparse.Namespace, notes: list[str]) -> list[Result]:
    """Start the HGS, run every phase, stop the HGS (also on errors and Ctrl-C)."""
    global MATERIAL, FABRIC  # noqa: PLW0603 (read by the forked generator processes)
    MATERIAL = make_material(args.ak)
    hgs = c.Hgs(args.workers, etcd_members=args.etcd)
    try:
        hgs.init(MATERIAL.puts, nonce_ttl=args.nonce_ttl)
        hgs.start()
        notes.append(f"HGS state ({hgs.store_name}) in {hgs.dir} ({c.filesystem(hgs.dir)})")
        if "release" in args.phases:
            FABRIC = _release.prepare(f"https://127.0.0.1:{hgs.port}", hgs.ca, MATERIAL.release)
        results = []
        if "healthz" in args.phases and shutil.which("wrk"):
            results.append(healthz_phase(hgs, args))
        for mode, label in LOADED_PHASES:
            if mode not in args.phases:
                continue
            top = attest_phase(hgs, args, mode, None, f"{label} max load (closed loop)")
            results.append(top)
            if top.rate > 0:
                name = f"{label} half load ({top.rate / 2:,.0f}/s open loop)"
                results.append(attest_phase(hgs, args, mode, top.rate / 2, name))
        return results
    finally:
        hgs.stop()


def report(args: argparse.Namespace, results: list[Result], notes: list[str]) -> None:
    """The table, the errors, the goal line."""
    print(
        f"hgs_throughput: guardfab HGS over HTTPS on 127.0.0.1, {args.workers} uvicorn workers; "
        f"load: {args.clients} generator processes x {args.connections} keep-alive connections; "
        f"{args.duration:g} s per phase after {args.warmup:g} s warm-up; nonces live"
        f" {args.nonce_ttl} s (expiring within every measured window); TPM evidence: "
        f"{c.BENCH_EVENTS}-event log, {args.ak.upper()} AK; {HOSTS} hosts per mode"
    )
    print(f"machine: {c.machine()}; server and load generator share these cores")
    for note in notes:
        print(f"note: {note}")
    print()
    rate_header = "releases/s" if args.mode == "release" else "attest/s"
    headers = ["phase", rate_header, "p50 ms", "p99 ms", "slowest", "errors",
               "HGS CPU (cores) worker split", "HGS ms/op", "load CPU (cores)",
               "load lag ms", "others"]  # fmt: skip
    print(c.table(headers, [r.row() for r in results]))
    for r in results:
        if r.first_error:
            print(f"first error in '{r.name}': {r.first_error}")
        if r.name.startswith("release"):
            print(f"'{r.name}': {r.checked:,} answers unwrapped with the host key and checked")
        if r.opened:
            print(f"'{r.name}': {r.opened} connection(s) reopened while measuring")
    print(
        "(each attestation = 2 HTTPS requests: challenge + attest; each release = 1 request "
        "carrying the previous answer's egress KP; CPU columns: seconds and "
        "(average cores); HGS ms/op = HGS CPU milliseconds per attestation or release; "
        "load lag ms = the load generator's worst event-loop lag (its own stalls count as "
        "latency); others = CPU used meanwhile by processes outside this bench)"
    )
    print()
    print(goal_line(args, {r.name.split(" (")[0]: r for r in results}))


def goal_line(args: argparse.Namespace, by_name: dict[str, Result]) -> str:
    """PASS/FAIL for issue 3 (attestations) or issue 4 (releases), NOT RUN where unmeasured."""
    release = args.mode == "release"
    parts = []
    for mode, label in LOADED_PHASES:
        if (mode == "release") != release:
            continue
        top, half = by_name.get(f"{label} max load"), by_name.get(f"{label} half load")
        if top is None:
            parts.append(f"{label}: NOT RUN")
            continue
        rate = top.rate
        parts.append(
            f"{label} >= {GOALS[mode]:,.0f}/s: {c.verdict(rate >= GOALS[mode])} ({rate:,.0f}/s)"
        )
        p99 = half.p99_ms if half and half.p99_ms is not None else float("inf")
        ok = c.verdict(p99 < P99_GOAL_MS)
        parts.append(f"{label} p99 < {P99_GOAL_MS:g} ms at half load: {ok} ({p99:.1f} ms)")
    issue = 4 if release else 3
    if args.etcd:
        # The issues' goals are set for the embedded store on this machine, where an
        # etcd cluster would also share the HGS's two cores: shown, not judged.
        return f"for reference, issue {issue}'s goals (set for the SQLite HGS): " + "; ".join(parts)
    return f"goal (issue {issue}): " + "; ".join(parts)


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Parse arguments, run the phases, print the report."""
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupted)  # stop everything as on Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    notes: list[str] = []
    if c.ensure_debian_tools({"wrk": "wrk"}, notes):
        notes.append("wrk unavailable: the healthz ceiling is not measured")
    try:
        results = run(args, notes)
    except KeyboardInterrupt:
        print("interrupted: the HGS, wrk and the load generator were stopped", file=sys.stderr)
        raise SystemExit(130) from None
    report(args, results, notes)


if __name__ == "__main__":
    main()
