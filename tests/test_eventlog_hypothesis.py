"""Property tests: generated logs round-trip through the parser and replay like hashlib.

The logs are written by the independent serializer in ``test_eventlog_builder``
(either format, random banks including ones guardfab cannot hash, events that
skip banks or list them out of order) and replayed by its reference replay.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardfab.errors import InvalidInputError
from guardfab.tpm import uefi
from guardfab.tpm.decode import decode
from guardfab.tpm.eventlog import LogFormat, Measurement, parse_event_log
from guardfab.tpm.events import EventType
from test_eventlog_builder import (
    EV_EFI_HCRTM_EVENT,
    EV_NO_ACTION,
    EV_SEPARATOR,
    SHA1,
    SHA256,
    SHA384,
    SHA512,
    AgileLog,
    Ev,
    reference_replay,
    sha1_log,
)

KNOWN_BANKS = [(SHA1, 20), (SHA256, 32), (SHA384, 48), (SHA512, 64)]
EVENT_TYPES = [t.value for t in EventType if t.value not in (EV_NO_ACTION, EV_EFI_HCRTM_EVENT)]

event_types = st.one_of(
    st.sampled_from(EVENT_TYPES),
    st.integers(0, 2**32 - 1).filter(lambda t: t not in (EV_NO_ACTION, EV_EFI_HCRTM_EVENT)),
)


@st.composite
def bank_lists(draw: st.DrawFn) -> list[tuple[int, int]]:
    known = draw(st.lists(st.sampled_from(KNOWN_BANKS), min_size=1, max_size=4, unique=True))
    unknown = draw(
        st.lists(
            st.tuples(st.integers(0x100, 0xFFFF), st.integers(1, 64)),
            max_size=2,
            unique_by=lambda bank: bank[0],
        )
    )
    return draw(st.permutations(known + unknown))


@st.composite
def agile_events(draw: st.DrawFn, banks: list[tuple[int, int]]) -> list[Ev]:
    algs = [alg for alg, _ in banks]
    events = []
    for _ in range(draw(st.integers(0, 12))):
        listed = draw(st.one_of(st.just(None), st.permutations(algs).flatmap(_prefix)))
        random_digests = draw(
            st.one_of(
                st.just(None),
                st.fixed_dictionaries(
                    {alg: st.binary(min_size=size, max_size=size) for alg, size in banks}
                ),
            )
        )
        events.append(
            Ev(
                pcr=draw(st.integers(0, 23)),
                type=draw(event_types),
                data=draw(st.binary(max_size=80)),
                digests=random_digests,
                banks=listed,
            )
        )
    return events


def _prefix(algs: list[int]) -> st.SearchStrategy[tuple[int, ...]]:
    return st.integers(0, len(algs)).map(lambda n: tuple(algs[:n]))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_agile_log_round_trips_and_replays(data: st.DataObject) -> None:
    banks = data.draw(bank_lists())
    events = data.draw(agile_events(banks))
    built = AgileLog(banks, events, vendor=data.draw(st.binary(max_size=8)))
    log = parse_event_log(built.build())
    assert log.format is LogFormat.CRYPTO_AGILE
    assert log.spec_id is not None
    assert list(log.spec_id.digest_sizes) == banks
    assert log.spec_id.vendor_info == built.vendor
    assert len(log.events) == len(events) + 1
    for parsed, event in zip(log.events[1:], events, strict=True):
        assert (parsed.pcr, parsed.event_type, parsed.data) == (event.pcr, event.type, event.data)
        assert list(parsed.digests.items()) == event.digest_list(banks)
    assert log.replay() == reference_replay(banks, events)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    pcrs=st.frozensets(st.integers(0, 23)),
    one=st.integers(0, 9),
    below=st.integers(0, 9),
)
def test_measurements_and_pcr_views_match_the_events(
    data: st.DataObject, pcrs: frozenset[int], one: int, below: int
) -> None:
    """The verifier's views (read from the parse's rows) say what the event list says.

    Measurements of small PCR sets are found through the log's PCR index, larger
    ones by a pass over every record; the facts' events (and separator records,
    with one bank's digest) by one pass comparing ints: all must give the same
    events in log order.
    """
    banks = data.draw(bank_lists())
    events = data.draw(agile_events(banks))
    for pcr in data.draw(st.lists(st.integers(0, 9), max_size=4)):  # separators, as the facts read
        events.insert(data.draw(st.integers(0, len(events))), Ev(pcr, EV_SEPARATOR, bytes(4)))
    log = parse_event_log(AgileLog(banks, events).build())
    # Read the views before the event list exists: they must not depend on it.
    views = {bank: log.measurements(bank, pcrs, Measurement) for bank, _ in banks}
    in_pcrs = log.events_in(pcrs)
    separators = log.events_in(pcrs, {EventType.EV_SEPARATOR})
    for_facts = log.pcr_and_separators(one, below)
    records = {bank: log.pcr_and_separator_records(one, below, bank) for bank, _ in banks}
    for bank, measured in views.items():
        expected = [
            (e.number, e.pcr, e.event_type, e.digests[bank], e.data)
            for e in log.events
            if e.event_type != EV_NO_ACTION and e.pcr in pcrs and bank in e.digests
        ]
        assert [tuple(m) for m in measured] == [(*e, None) for e in expected]
    assert in_pcrs == tuple(e for e in log.events if e.pcr in pcrs)
    assert separators == tuple(e for e in in_pcrs if e.event_type == EventType.EV_SEPARATOR)
    assert for_facts == tuple(
        e
        for e in log.events
        if e.pcr == one or (e.pcr < below and e.event_type == EventType.EV_SEPARATOR)
    )
    assert log.pcr_and_separators(one, below) == for_facts  # again, from the event list
    for bank, (of_pcr, separator_records) in records.items():
        assert of_pcr == tuple(e for e in log.events if e.pcr == one)
        assert separator_records == [
            (e.number, e.pcr, e.data, e.digests.get(bank))
            for e in for_facts
            if e.pcr < below and e.event_type == EventType.EV_SEPARATOR
        ]
        assert log.pcr_and_separator_records(one, below, bank)[0] == of_pcr  # from the list


@settings(max_examples=100)
@given(
    events=st.lists(
        st.builds(
            Ev,
            pcr=st.integers(0, 23),
            type=event_types,
            data=st.binary(max_size=80),
            digests=st.one_of(
                st.none(), st.fixed_dictionaries({SHA1: st.binary(min_size=20, max_size=20)})
            ),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_generated_sha1_log_round_trips_and_replays(events: list[Ev]) -> None:
    log = parse_event_log(sha1_log(events))
    assert log.format is LogFormat.SHA1
    assert [(e.pcr, e.event_type, e.data) for e in log.events] == [
        (e.pcr, e.type, e.data) for e in events
    ]
    assert log.replay() == reference_replay([(SHA1, 20)], events)


@settings(max_examples=100)
@given(locality=st.sampled_from([0, 3]), banks=bank_lists())
def test_startup_locality_sets_the_start_of_pcr0(
    locality: int, banks: list[tuple[int, int]]
) -> None:
    events = [Ev(0, EV_NO_ACTION, b"StartupLocality\0" + bytes([locality])), Ev(0, 1, b"crtm")]
    log = parse_event_log(AgileLog(banks, events).build())
    assert log.replay() == reference_replay(banks, events, locality=locality)


@settings(max_examples=300)
@given(
    event_type=event_types | st.just(EV_NO_ACTION),
    data=st.binary(max_size=300),
    uintn=st.sampled_from([4, 8]),
)
def test_decoding_any_data_never_raises_and_is_json(
    event_type: int, data: bytes, uintn: int
) -> None:
    decoded = decode(event_type, data, uintn)
    json.dumps(decoded.fields)
    assert isinstance(decoded.summary, str)


@settings(max_examples=300)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_parse_or_raise_invalid_input(data: bytes) -> None:
    try:
        log = parse_event_log(data)
    except InvalidInputError:
        return
    json.dumps(log.to_dict())


_KEYS = [(uefi.EFI_GLOBAL_VARIABLE, n) for n in ("SecureBoot", "PK", "KEK")] + [
    (uefi.EFI_IMAGE_SECURITY_DATABASE, n) for n in ("db", "dbx")
]
_NEAR_KEYS = [
    (uefi.EFI_IMAGE_SECURITY_DATABASE, "PK"),
    (uefi.EFI_GLOBAL_VARIABLE, "Pk"),
    (uefi.EFI_GLOBAL_VARIABLE, "SecureBoo"),
    (bytes(16), "db"),
]


@st.composite
def variable_data(draw: st.DrawFn) -> bytes:
    """UEFI_VARIABLE_DATA of a known or nearly known variable; a field may lie, the end be cut."""
    guid, name = draw(
        st.sampled_from(_KEYS + _NEAR_KEYS)
        | st.tuples(st.binary(min_size=16, max_size=16), st.text(max_size=12))
    )
    encoded = name.encode("utf-16-le", "surrogatepass")
    contents = draw(st.binary(max_size=24))
    name_chars, data_len, extra, cut = len(name), len(contents), b"", None
    fault = draw(st.sampled_from(["none", "name length", "data length", "extra", "cut"]))
    if fault == "name length":
        name_chars = draw(st.sampled_from([name_chars + 1, max(name_chars - 1, 0), 2**63]))
    elif fault == "data length":
        data_len = draw(st.sampled_from([data_len + 1, max(data_len - 1, 0), 2**64 - 1]))
    elif fault == "extra":
        extra = draw(st.binary(min_size=1, max_size=2))
    head = guid + name_chars.to_bytes(8, "little") + data_len.to_bytes(8, "little")
    whole = head + encoded + contents + extra
    if fault == "cut":
        cut = draw(st.integers(0, max(len(whole) - 1, 0)))
    return whole[:cut]


@settings(max_examples=400)
@given(data=variable_data())
def test_known_variables_match_exactly_what_parse_variable_names(data: bytes) -> None:
    """The facts' raw-byte match finds a key (and contents) iff the full parse names it."""
    try:
        var = uefi.parse_variable(data)
    except uefi.UndecodableError:
        expected = None
    else:
        key = (var.guid, var.name)
        expected = (key, var.data) if key in _KEYS else None
    assert uefi.KnownVariables(_KEYS).match(data) == expected
