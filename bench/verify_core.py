"""How fast is guardfab's full TPM evidence check, next to Keylime's verifier and the floor?

In one run, on the same inputs (a 100-event crypto-agile boot log, SHA-1 + SHA-256
banks, a quote over PCRs 0-9 and 14 bound to a nonce and host key, RSA-2048 and
ECC P-256 AKs), one core each, it times:

* **guardfab**: ``evidence_from_dict`` + ``verify_tpm_evidence``: EK and AK binding,
  quote signature, nonce and PCR digest, event-log parse and SHA-256 replay, PCR
  comparison, facts, baseline match, CI policy and every policy. A host sends the
  same log at every attestation until it reboots, so the log's decoding, parse,
  replay and facts are cached by content (the quote, the nonce binding and the
  comparison of every quoted PCR with the replay are done every time); a second
  row, "new log", forgets every cached log before each check (a host's first
  attestation after a reboot);
* **Keylime** (from PyPI, pinned, in its own venv under ``~/.cache/guardfab-bench``):
  ``Tpm().check_quote`` with the measured-boot log and a refstate made from it by
  Keylime's own ``create_mb_refstate``, policy "example", evaluated on every check.
  Its parser shells out to ``tpm2_eventlog`` (Debian tpm2-tools), which this bench
  installs if missing, with libefivar1 and python3-gpg that Keylime also loads;
* **floor**: one ``cryptography`` signature verify of the quote + a hashlib
  SHA-256 replay of the log, read from the same log bytes the engines get: one
  precompiled ``struct`` call per record (the bench log's layout, derived from
  its header before timing) and one extend, nothing else (no bounds, no checks);
* **floor, digests pre-extracted**: the same with the 100 SHA-256 digests handed
  over already extracted (no walk of the log at all), shown for comparison; it
  is not on the same input as the others, so the goal line judges the floor above.

The engines take turns in short rounds (best of each shown), so that load from
other processes falls on all of them alike. Each engine is first shown to refuse
a log that does not replay to the quote (so the timed path really compares the
quote with the log's replay). It also reports, for every log in
``shared/vectors/eventlogs``, whether guardfab replays it to the PCRs in its
``.yaml`` and what Keylime's parser does with it.

Usage: ``.venv/bin/python bench/verify_core.py [--seconds 3] [--repeat 10]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as c
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.evidence import TpmEvidence, evidence_from_dict
from guardfab.attestation.result import AttestationStatus
from guardfab.attestation.summary import QuotedLog
from guardfab.attestation.tpm_mode import forget_logs, verify_tpm_evidence
from guardfab.attestation.trust import TrustState
from guardfab.formats.encoding import b64url_decode
from guardfab.tpm.eventlog import parse_event_log
from guardfab.tpm.events import EventType
from guardfab.tpm.quote import AttestationKey, verify_quote
from test_attestation_fixtures import NONCE, NOW

KEYLIME_VERSION = "7.14.3"
#: What Keylime's check_quote imports, beside keylime itself (it declares no dependencies).
KEYLIME_DEPS = ("cryptography", "pyyaml", "packaging", "pyasn1", "pyasn1-modules")
KEYLIME_DEPS += ("jsonschema", "lark")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "guardfab-bench"
VECTORS = c.REPO.parent / "shared" / "vectors" / "eventlogs"
KINDS = {"rsa": "RSA-2048 AK", "ecc": "ECC P-256 AK"}
#: Table rows: engine key and its label.
ENGINES = {"guardfab": "guardfab", "guardfab-new-log": "guardfab new log", "keylime": "keylime"}
ENGINES |= {"floor": "floor", "floor-digests": "floor, digests pre-extracted,"}
_BANKS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
_SHA256 = 0x000B
_DEBIAN_PYTHON = "/usr/bin/python3"
_GPG = "/usr/lib/python3/dist-packages/gpg"

# Runs inside Keylime's venv. Prints one JSON object on stdout; logs go to stderr.
_KEYLIME_CHILD = r"""
import argparse, base64, json, resource, sys, time
from pathlib import Path

def cpu():
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

def main():
    inputs = json.loads(Path(sys.argv[1]).read_text())
    from importlib.metadata import version
    from keylime.common.algorithms import Hash
    from keylime.mba import mba
    from keylime.policy.create_mb_policy import create_mb_refstate
    from keylime.tpm.tpm_main import Tpm
    mba.load_imports(skip_custom_policies=True)
    log_path = Path(sys.argv[1]).with_name("bench-log.bin")
    log = base64.b64decode(inputs["log"])
    log_path.write_bytes(log)
    refstate = create_mb_refstate(argparse.Namespace(
        eventlog_file=str(log_path), without_secureboot=False, output=str(log_path) + ".refstate"))
    if not refstate:
        raise SystemExit("create_mb_refstate could not make a refstate from the bench log")
    policy = json.dumps(refstate)
    tpm = Tpm()
    out = {"keylime": version("keylime"), "cryptography": version("cryptography"),
           "pyyaml": version("pyyaml"), "kinds": {}, "vectors": {}}

    def check(q, nonce, mb_log, mb_policy=policy):
        failure = tpm.check_quote(None, nonce, None, q["quote"], base64.b64decode(q["ak"]),
            tpm_policy={}, hash_alg=Hash.SHA256, mb_measurement_list=mb_log,
            mb_policy=mb_policy, mb_policy_name="example", count=0)
        return [e.event_id for e in failure.events]

    tampered = base64.b64decode(inputs["tampered_log"])
    for kind, q in inputs["quotes"].items():
        nonce = base64.b64decode(q["nonce"])
        result = {"honest": check(q, nonce, log), "tampered_log": check(q, nonce, tampered)}
        runs = []
        check(q, nonce, log)
        for _ in range(inputs["repeat"]):
            n, cpu0, t0 = 0, cpu(), time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < inputs["seconds"]:
                check(q, nonce, log)
                n += 1
            runs.append((n / (time.perf_counter() - t0), (cpu() - cpu0) / n))
        best = max(runs)
        result.update(rate=best[0], cpu_per_check=best[1])
        out["kinds"][kind] = result
    for name, (blob, bank) in inputs["vectors"].items():
        try:
            pcrs, _agg, _data, failure = mba.bootlog_parse(blob, bank)
            out["vectors"][name] = {"pcrs": {k: int(v) for k, v in pcrs.items()},
                                    "failure": [e.event_id for e in failure.events]}
        except Exception as exc:
            cause = exc.__cause__ or exc
            crash = f"{type(exc).__name__} from {type(cause).__name__}: {cause}"
            out["vectors"][name] = {"crash": crash}
    print(json.dumps(out))

main()
"""

_VERIFIER_CONF = """[verifier]
measured_boot_policy_name = example
measured_boot_imports = []
measured_boot_evaluate = always
"""
# Keylime logs at WARNING here (its packaged default is INFO): no log I/O in the timed loop.
_LOGGING_CONF = """[loggers]
keys = root,keylime
[handlers]
keys = stderr
[formatters]
keys = plain
[formatter_plain]
format = %(name)s %(levelname)s %(message)s
[handler_stderr]
class = StreamHandler
level = NOTSET
formatter = plain
args = (sys.stderr,)
[logger_root]
level = WARNING
handlers = stderr
[logger_keylime]
level = WARNING
handlers =
qualname = keylime
"""


class KeylimeUnavailableError(RuntimeError):
    """Keylime could not be installed or driven here; the message says why."""


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Case:
    """One AK kind: the evidence, the trust that admits it, and what the floor needs."""

    kind: str
    evidence: TpmEvidence
    trust: TrustState
    verify_signature: Callable[[], None]
    keylime_quote: dict[str, str]


def tpm2_tools_pcrs(pcrs: dict[int, bytes]) -> bytes:
    """PCR values as ``tpm2_quote -o`` writes them (what Keylime's quote string carries).

    TPML_PCR_SELECTION (count, 16 x {hash u16, sizeofSelect u8, pcrSelect[3], pad}),
    then the number of TPML_DIGESTs and each {count u32, 8 x {size u16, 64 bytes}},
    little-endian C structs.
    """
    select = sum(1 << pcr for pcr in pcrs)
    head = struct.pack("<IHB", 1, _SHA256, 3) + select.to_bytes(3, "little") + bytes(2 + 8 * 15)
    values = [pcrs[pcr] for pcr in sorted(pcrs)]
    chunks = [values[i : i + 8] for i in range(0, len(values), 8)]
    body = struct.pack("<I", len(chunks))
    for chunk in chunks:
        body += struct.pack("<I", len(chunk))
        for n in range(8):
            value = chunk[n] if n < len(chunk) else b""
            body += struct.pack("<H", len(value)) + value.ljust(64, b"\0")
    return head + body


def _signature_check(host: c.BenchHost, attest: bytes) -> Callable[[], None]:
    """The floor's one signature verify, with a key and signature made ready beforehand."""
    private = host.ak.private
    if isinstance(private, rsa.RSAPrivateKey):
        public_rsa, pad = private.public_key(), padding.PKCS1v15()
        signature = private.sign(attest, pad, hashes.SHA256())
        return lambda: public_rsa.verify(signature, attest, pad, hashes.SHA256())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    public_ec, algorithm = private.public_key(), ec.ECDSA(hashes.SHA256())
    signature = private.sign(attest, algorithm)
    return lambda: public_ec.verify(signature, attest, algorithm)


def make_case(kind: str, boot: c.BenchBoot, log: bytes) -> Case:
    """Honest evidence for ``kind`` and the same quote in Keylime's wire form."""
    host = c.BenchHost(host_id=f"host-{kind}", ak_kind=kind, boot=boot)
    evidence = host.evidence(NONCE, quoted=c.QUOTED_PCRS)
    parts = (evidence.quote_attest, evidence.quote_signature, tpm2_tools_pcrs(dict(evidence.pcrs)))
    qualifying = quote_qualifying_data(NONCE, dict(evidence.host_key))
    keylime_quote = {
        "quote": "r" + ":".join(base64.b64encode(p).decode() for p in parts),
        "ak": base64.b64encode(evidence.ak_public).decode(),
        "nonce": base64.b64encode(qualifying).decode(),
    }
    return Case(
        kind,
        evidence,
        c.bench_trust([host], log),
        _signature_check(host, evidence.quote_attest),
        keylime_quote,
    )


def log_digests(log: bytes) -> list[tuple[int, bytes]]:
    """(PCR, SHA-256 digest) of every extending event, extracted once for the floor."""
    events = parse_event_log(log).events
    skip = int(EventType.EV_NO_ACTION)
    return [(e.pcr, e.digests[_SHA256]) for e in events if e.event_type != skip]


# ------------------------------------------------------------------ guardfab and the floor


def guardfab_check(case: Case) -> Callable[[], object]:
    """The timed guardfab call: load the evidence JSON object, verify it, insist on Passed."""
    wire = case.evidence.to_dict()
    text = wire["event_log"]

    def check() -> object:
        # A new log text object each time, as a freshly parsed request body has:
        # Python keeps a str's hash in the object, and the log cache is keyed by
        # the text (the copy, ~1 us, is timed too).
        body = {**wire, "event_log": text[:-1] + text[-1]}
        return verify_tpm_evidence(evidence_from_dict(body), case.trust, nonce=NONCE, now=NOW)

    result = check()
    if result.status is not AttestationStatus.PASSED:  # type: ignore[attr-defined]
        raise SystemExit(f"guardfab refused the honest {case.kind} evidence: {result}")
    return check


def guardfab_new_log_check(case: Case) -> Callable[[], object]:
    """The guardfab call with every cached log forgotten first: decode, parse, replay, facts."""
    check = guardfab_check(case)

    def first_sight() -> object:
        forget_logs()
        return check()

    return first_sight


def guardfab_refuses_tampered(case: Case, tampered: bytes) -> str:
    """The check name guardfab fails a log that does not replay to the quote with."""
    evidence = TpmEvidence.from_dict({**case.evidence.to_dict(), "event_log": _b64url(tampered)})
    result = verify_tpm_evidence(evidence, case.trust, nonce=NONCE, now=NOW)
    return ", ".join(f.check for f in result.failures) or "NOT REFUSED"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def floor_check(case: Case, log: bytes) -> Callable[[], object]:
    """One signature verify + a hashlib replay of the log's SHA-256 bank, read from its bytes.

    Each extend hashes in a copy of one fresh SHA-256 context (hashlib's fastest
    way here: ~10 % less than ``sha256(data).digest()``, which guardfab's replay
    uses too). The minimal direct replay of the input every engine gets: the layout of a
    record head is derived from the log's header beforehand (PCR, type, the
    SHA-256 digest and the data size; every other field skipped as padding),
    then each record is one ``unpack_from`` and, unless it is EV_NO_ACTION, one
    extend. It trusts the log entirely: no bound, shape or PCR index is checked.
    """
    first, head = _raw_layout(log)
    unpack, size, total = head.unpack_from, head.size, len(log)
    zero, fresh, no_action = bytes(32), hashlib.sha256().copy, int(EventType.EV_NO_ACTION)

    def check() -> object:
        case.verify_signature()
        pcrs: dict[int, bytes] = {}
        offset = first
        while offset < total:
            pcr, event_type, digest, data_size = unpack(log, offset)
            offset += size + data_size
            if event_type != no_action:
                extend = fresh()
                extend.update(pcrs.get(pcr, zero) + digest)
                pcrs[pcr] = extend.digest()
        return pcrs

    return check


def _raw_layout(log: bytes) -> tuple[int, struct.Struct]:
    """Where the first TCG_PCR_EVENT2 record starts, and its head as (PCR, type, SHA-256, size)."""
    spec = parse_event_log(log).spec_id
    if spec is None:
        raise SystemExit("the bench log is not crypto-agile")
    banks = "".join(f"2x{n}s" if alg == _SHA256 else f"2x{n}x" for alg, n in spec.digest_sizes)
    return 32 + spec.size, struct.Struct(f"<II4x{banks}I")


def floor_digests_check(case: Case, digests: list[tuple[int, bytes]]) -> Callable[[], object]:
    """One signature verify + a hashlib replay of the log's SHA-256 digests, already extracted."""
    zero, fresh = bytes(32), hashlib.sha256().copy

    def check() -> object:
        case.verify_signature()
        pcrs: dict[int, bytes] = {}
        for pcr, digest in digests:
            extend = fresh()
            extend.update(pcrs.get(pcr, zero) + digest)
            pcrs[pcr] = extend.digest()
        return pcrs

    return check


def stage_costs(case: Case, seconds: float) -> str:
    """Where guardfab's time goes (ECC or RSA as ``case``), each part timed alone, in µs.

    The steady check is split into loading the evidence, the quote and the rest;
    then what a new log adds (the "new log" row minus the steady one), split
    into its stages. Facts are timed on a freshly parsed log (a parsed log
    keeps its digest checks) minus the parse; the CI policy's PCR 9 events (the
    only summary records an attestation makes: the HGS stores the log itself and
    the rest are made when a person reads them, ADR 0018) on a parsed log. The
    parts take turns in rounds, like the engines.
    """
    evidence, wire = case.evidence, case.evidence.to_dict()
    log = parse_event_log(evidence.event_log)
    expected = quote_qualifying_data(NONCE, dict(evidence.host_key))
    ak = AttestationKey.of(evidence.ak_public)  # checked and kept per AK, as the HGS does
    text = wire["event_log"]
    parts: dict[str, Callable[[], object]] = {
        "steady": guardfab_check(case),
        "new log": guardfab_new_log_check(case),
        "load": lambda: evidence_from_dict(wire),
        "quote": lambda: verify_quote(
            evidence.quote_attest, evidence.quote_signature, ak,
            expected_nonce=expected, pcr_values={_SHA256: dict(evidence.pcrs)}),
        "signature": case.verify_signature,
        "decode": lambda: b64url_decode(text, what="event_log"),
        "parse": lambda: parse_event_log(evidence.event_log),
        "replay": lambda: log.replay([_SHA256]),
        "parse+facts": lambda: parse_event_log(evidence.event_log).facts(_SHA256),
        "records": lambda: QuotedLog(evidence.event_log, log, c.QUOTED_PCRS).events_in(9),
    }  # fmt: skip
    rates = c.interleaved_best_rates(parts, seconds, rounds=5)
    us = {name: 1e6 / rate for name, rate in rates.items()}
    rest = us["steady"] - us["load"] - us["quote"]
    added = us["new log"] - us["steady"]
    facts = us["parse+facts"] - us["parse"]
    other = added - us["decode"] - us["parse"] - us["replay"] - facts - us["records"]
    return (
        f"steady check {us['steady']:.0f} = load evidence JSON object (log text looked up) "
        f"{us['load']:.0f} + quote: signature, nonce, PCR digest {us['quote']:.0f} (the "
        f"signature alone {us['signature']:.0f}) + the rest (identity, AK, cached log and PCR "
        f"comparison, summary, baseline, policies) {rest:.0f}; a new log adds {added:.0f} = "
        f"base64url decode {us['decode']:.0f} + parse {us['parse']:.0f} + SHA-256 replay "
        f"{us['replay']:.0f} + facts (with the digest checks of the data they read) "
        f"{facts:.0f} + PCR 9's events for the CI policy {us['records']:.0f} + the rest "
        f"(cache upkeep and the forgotten log's release, facts as records) {other:.0f}"
    )


# ------------------------------------------------------------------ vectors


def yaml_pcrs(path: Path) -> dict[str, dict[int, bytes]]:
    """The PCRs per bank that tpm2_eventlog printed at the end of a vector's .yaml."""
    text = path.read_text().split("\npcrs:", 1)[1]
    banks: dict[str, dict[int, bytes]] = {}
    current = None
    for line in text.splitlines():
        if bank := re.fullmatch(r"  (sha\w+):", line):
            current = banks.setdefault(bank.group(1), {})
        elif (value := re.fullmatch(r" +(\d+) +: 0x([0-9a-f]+)", line)) and current is not None:
            current[int(value.group(1))] = bytes.fromhex(value.group(2))
    return banks


def guardfab_vector(blob: bytes, expected: dict[str, dict[int, bytes]]) -> str:
    """'ok' when guardfab's parser replays every bank of the log to the .yaml's PCRs."""
    try:
        log = parse_event_log(blob)
        replayed = log.replay(log.replayable_banks)
    except Exception as exc:  # noqa: BLE001 (report any failure, whatever it is)
        return f"error: {type(exc).__name__}: {exc}"
    for name, pcrs in expected.items():
        if replayed.get(_BANKS[name], {}) != pcrs:
            return f"MISMATCH in {name}"
    extra = {alg for alg, pcrs in replayed.items() if pcrs} - {_BANKS[n] for n in expected}
    if extra:
        return f"MISMATCH: extra bank(s) {sorted(extra)}"
    return f"ok ({len(log.events)} records, banks {'+'.join(expected) or 'none'})"


def keylime_vector(answer: dict[str, Any], bank: str, expected: dict[str, dict[int, bytes]]) -> str:
    """Keylime's parser on one vector: ok, refused (a failure event) or crash."""
    if "crash" in answer:
        return "CRASH: " + answer["crash"][:90]
    if answer["failure"]:
        return "refused: " + ", ".join(answer["failure"])
    want = {str(pcr): int.from_bytes(v, "big") for pcr, v in expected.get(bank, {}).items()}
    return f"ok ({bank})" if answer["pcrs"] == want else f"MISMATCH in {bank}"


def vector_inputs() -> dict[str, tuple[bytes, dict[str, dict[int, bytes]], str]]:
    """Every vector log: its bytes, the .yaml's PCRs, and the bank Keylime is asked for."""
    out = {}
    for path in sorted(VECTORS.glob("*.bin")):
        expected = yaml_pcrs(path.with_name(path.name + ".yaml"))
        bank = "sha256" if "sha256" in expected or not expected else next(iter(expected))
        out[path.name] = (path.read_bytes(), expected, bank)
    if not out:
        raise SystemExit(f"no vector logs under {VECTORS}: clone shared/ beside the repository")
    return out


# ------------------------------------------------------------------ Keylime


def keylime_python(notes: list[str]) -> Path:
    """Keylime's venv (created and filled on first use); raises with the reason if impossible."""
    missing = c.ensure_debian_tools(
        {"tpm2_eventlog": "tpm2-tools", "libefivar.so.1": "libefivar1", _GPG: "python3-gpg"}, notes
    )
    if missing:
        raise KeylimeUnavailableError(f"Debian package(s) {', '.join(missing)} missing")
    venv = CACHE / "keylime-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        _run([_DEBIAN_PYTHON, "-m", "venv", str(venv)], "python3 -m venv")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_output([str(python), "-c", where]))
    gpg = purelib / "gpg"
    if not gpg.exists():
        gpg.symlink_to(_GPG)  # Keylime's GPG bindings must match the system's libgpgme
    probe = "import importlib.metadata as m, keylime.tpm.tpm_main; print(m.version('keylime'))"
    check = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if check.returncode != 0 or check.stdout.strip() != KEYLIME_VERSION:
        notes.append(f"installed keylime=={KEYLIME_VERSION} into {venv}")
        packages = [f"keylime=={KEYLIME_VERSION}", *KEYLIME_DEPS]
        _run([str(python), "-m", "pip", "install", "-q", *packages], "pip install keylime")
    return python


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KeylimeUnavailableError(f"{what} failed: {done.stderr.strip()[-400:]}")


def _output(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KeylimeUnavailableError(f"{command[0]} failed: {done.stderr.strip()[-400:]}")
    return done.stdout.strip()


def run_keylime(python: Path, inputs: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the Keylime child on ``inputs``; its JSON answer."""
    with tempfile.TemporaryDirectory(prefix="guardfab-keylime-") as work:
        folder = Path(work)
        (folder / "inputs.json").write_text(json.dumps(inputs))
        (folder / "verifier.conf").write_text(_VERIFIER_CONF)
        (folder / "logging.conf").write_text(_LOGGING_CONF)
        env = {
            **os.environ,
            "KEYLIME_VERIFIER_CONFIG": str(folder / "verifier.conf"),
            "KEYLIME_LOGGING_CONFIG": str(folder / "logging.conf"),
        }
        try:
            done = subprocess.run(
                [str(python), "-c", _KEYLIME_CHILD, str(folder / "inputs.json")],
                capture_output=True, text=True, cwd=folder, env=env, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise KeylimeUnavailableError(f"Keylime did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0 or not done.stdout.strip():
        raise KeylimeUnavailableError(f"Keylime failed: {done.stderr.strip()[-600:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def keylime_inputs(
    cases: list[Case], log: bytes, tampered: bytes, vectors: dict[str, Any], args: Any
) -> dict[str, Any]:
    """What the Keylime child needs, all base64."""
    return {
        "log": _b64(log),
        "tampered_log": _b64(tampered),
        "quotes": {case.kind: case.keylime_quote for case in cases},
        "vectors": {name: (_b64(blob), bank) for name, (blob, _e, bank) in vectors.items()},
        "seconds": args.seconds / args.repeat,
        "repeat": args.repeat,
    }


# ------------------------------------------------------------------ report


def report_rows(rates: dict[str, dict[str, float]]) -> list[list[str]]:
    """Table rows: engine x AK kind, with the ratios to Keylime and to the floor."""
    rows = []
    for engine, engine_label in ENGINES.items():
        for kind, label in KINDS.items():
            name = f"{engine_label} {label}"
            rate = rates.get(engine, {}).get(kind)
            if rate is None:
                rows.append([name, "n/a", "n/a", "n/a", "n/a"])
                continue
            keylime = rates.get("keylime", {}).get(kind)
            vs_keylime = f"{rate / keylime:.1f}x" if keylime else "n/a"
            ratio = rates["floor"][kind] / rate
            vs_floor = f"{ratio:.2f}x slower" if ratio >= 1 else f"{1 / ratio:.2f}x faster"
            rows.append([name, f"{rate:,.0f}", f"{1e6 / rate:,.1f}", vs_keylime, vs_floor])
    return rows


def print_vectors(vectors: dict[str, Any], keylime: dict[str, Any] | None, reason: str) -> bool:
    """The per-vector table; True if guardfab handled every vector."""
    rows, all_ok = [], True
    for name, (blob, expected, bank) in vectors.items():
        ours = guardfab_vector(blob, expected)
        all_ok &= ours.startswith("ok")
        theirs = keylime_vector(keylime[name], bank, expected) if keylime else f"n/a ({reason})"
        rows.append([name, ours, theirs])
    headers = ["vector log", "guardfab: parse + replay vs its .yaml", "Keylime: bootlog_parse"]
    print(c.table(headers, rows, numeric=False))
    return all_ok


def main() -> None:
    """Build the inputs, time the three engines, print the tables and the goal line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per engine and AK")
    parser.add_argument(
        "--repeat", type=int, default=10, help="rounds the engines take turns in (best shown)"
    )
    args = parser.parse_args()
    notes: list[str] = []
    boot = c.BenchBoot()
    log = boot.log_bytes()
    tampered = c.BenchBoot(boot_order=b"\x02\x00\x01\x00").log_bytes()
    cases = [make_case(kind, boot, log) for kind in KINDS]
    digests = log_digests(log)
    vectors = vector_inputs()
    busy, own, began = c.machine_busy_seconds(), c.own_cpu_seconds(), time.monotonic()
    rates: dict[str, dict[str, float]] = {name: {} for name in ENGINES if name != "keylime"}
    for case in cases:
        calls = {
            "guardfab": guardfab_check(case),
            "floor": floor_check(case, log),
            "guardfab-new-log": guardfab_new_log_check(case),
            "floor-digests": floor_digests_check(case, digests),
        }
        if calls["floor"]() != calls["floor-digests"]():
            raise SystemExit("the two floors replay the bench log to different PCRs")
        for engine, rate in c.interleaved_best_rates(calls, args.seconds, args.repeat).items():
            rates[engine][case.kind] = rate
    keylime, reason = None, ""
    try:
        python = keylime_python(notes)
        inputs = keylime_inputs(cases, log, tampered, vectors, args)
        keylime = run_keylime(python, inputs, timeout=120 + 4 * args.seconds)
        rates["keylime"] = {k: v["rate"] for k, v in keylime["kinds"].items()}
    except KeylimeUnavailableError as exc:
        reason = str(exc)
    others = c.machine_busy_seconds() - busy - (c.own_cpu_seconds() - own)
    notes.append(
        f"other processes used {max(0.0, others) / (time.monotonic() - began):.2f} cores on "
        f"average while this ran (of {os.cpu_count()}); rows are the best of {args.repeat} "
        "rounds in which guardfab, its new-log variant and the two floors took turns"
    )
    print_report(args, rates, cases, tampered, keylime, reason, notes, vectors, len(digests))


def print_report(
    args: Any,
    rates: dict[str, dict[str, float]],
    cases: list[Case],
    tampered: bytes,
    keylime: dict[str, Any] | None,
    reason: str,
    notes: list[str],
    vectors: dict[str, Any],
    events: int,
) -> None:
    """Everything the bench prints."""
    print(f"verify_core: full TPM evidence check, {events}-event boot log (SHA-1 + SHA-256), "
          f"quote over PCRs {','.join(map(str, c.QUOTED_PCRS))}; one core; "
          f"best of {args.repeat} rounds, {args.seconds:g} s per row")  # fmt: skip
    print(f"machine: {c.machine()}")
    if keylime:
        print(f"Keylime {keylime['keylime']} (cryptography {keylime['cryptography']}, PyYAML "
              f"{keylime['pyyaml']}) in {CACHE / 'keylime-venv'}, tpm2_eventlog from Debian "
              "tpm2-tools; refstate by Keylime's create_mb_refstate, policy 'example', "
              "evaluated on every check")  # fmt: skip
    else:
        print(f"Keylime: NOT MEASURED: {reason}")
    for note in notes:
        print(f"note: {note}")
    print()
    headers = ["engine", "checks/s", "µs/check", "vs Keylime", "vs floor"]
    print(c.table(headers, report_rows(rates)))
    print()
    for case in cases:
        line = f"{KINDS[case.kind]}: a log that does not replay to the quote: guardfab fails "
        line += guardfab_refuses_tampered(case, tampered)
        if keylime:
            answer = keylime["kinds"][case.kind]
            line += f"; Keylime fails {', '.join(answer['tampered_log']) or 'NOTHING'}"
            line += f" (honest: {', '.join(answer['honest']) or 'passes'}; "
            line += f"{answer['cpu_per_check'] * 1e3:.1f} ms CPU/check incl. tpm2_eventlog)"
        print(line)
    print()
    for case in cases:
        print(f"where guardfab's time goes ({KINDS[case.kind]}, each part timed alone, µs): "
              + stage_costs(case, 0.9))  # fmt: skip
    print()
    vectors_ok = print_vectors(vectors, keylime["vectors"] if keylime else None, reason)
    print()
    print_goal(rates, vectors_ok, len(vectors))


def print_goal(rates: dict[str, dict[str, float]], vectors_ok: bool, count: int) -> None:
    """The issue's goal line with PASS/FAIL for each part."""
    ours, floor = rates["guardfab"], rates["floor"]
    slowdown = max(floor[k] / ours[k] for k in KINDS)
    new_log = max(floor[k] / rates["guardfab-new-log"][k] for k in KINDS)
    pre_extracted = max(rates["floor-digests"][k] / rates["guardfab-new-log"][k] for k in KINDS)
    vs_keylime = "NOT MEASURED"
    if "keylime" in rates:
        speedup = min(ours[k] / rates["keylime"][k] for k in KINDS)
        vs_keylime = f"{c.verdict(speedup >= 50)} (worst {speedup:.0f}x)"
    # Both readings of "the full evidence check": a host re-attesting with the log it
    # sent before (parse and replay cached, ADR 0012), and a log seen for the first time.
    print(
        f"goal (issue 3): >= 50x Keylime: {vs_keylime}; within 3x of the floor: "
        f"a known log {c.verdict(slowdown <= 3)} (worst {slowdown:.2f}x), "
        f"a new log {c.verdict(new_log <= 3)} (worst {new_log:.2f}x; {pre_extracted:.2f}x of "
        f"the floor given pre-extracted digests); "
        f"every vector log handled: {c.verdict(vectors_ok)} ({count} logs)"
    )


if __name__ == "__main__":
    main()
