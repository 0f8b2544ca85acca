"""C-FIND against hostile queries (an outside fuzzing run): wildcard patterns on which Python's re
backtracked for seconds per value while holding the interpreter lock, so the whole node froze.
Here: the wildcard matcher's semantics (PS3.4 C.2.2.2) and cost, the worst patterns over a real
association against 10^4 studies with a C-ECHO alongside, and the [query] limits."""

from __future__ import annotations

import itertools
import operator
import random
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT
from pynetdicom.sop_class import Verification
from sqlalchemy import insert

from db.engine import make_engine
from db.links import LinkStore
from db.migrate import upgrade
from db.models import Patient, Series, SeriesState, Study
from dicom_node.config import QuerySettings, load_settings
from linkage.matching import key_matcher, matches
from dicom_node.qrscp import OUT_OF_RESOURCES, PENDING, SUCCESS, make_find_handler
from tests.helpers import RunningNode, _drop_postgres_database, module_database, node_config, write_toml
from tests.test_priors import add_study

N_STUDIES = 10_000

# The fuzzer's pattern (8.7 s on one 64-character Study Description with a backtracking matcher), long *a*a...
# chains, and a long literal tail after one * (quadratic for the classic two-pointer matcher).
WORST = [
    ("StudyDescription", "*?*?*?*?*?*?*?*#"),
    ("StudyDescription", "*a" * 31 + "*b"),
    ("StudyDescription", "*" + "a" * 31 + "b"),
    ("StudyDescription", "*" + "?a" * 31 + "#"),
    ("PatientName", "*?" * 31 + "*#"),
    ("PatientName", "*a" * 31 + "*b"),          # case-insensitive, against 64 x "A"
    ("AccessionNumber", "*?*?*?*?*?*?*?*#"),
]


# ----- the matcher ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, pattern, value, expected", [
    ("text", "ABC", "ABC", True),
    ("text", "ABC", "ABCD", False),
    ("text", "A*", "A", True),                  # * matches the empty sequence
    ("text", "*", "", True),                    # universal: matches even an empty value
    ("text", "A*C", "ABBBC", True),
    ("text", "A*C", "ABBBD", False),
    ("text", "A?C", "ABC", True),
    ("text", "A?C", "AC", False),               # ? is exactly one character
    ("text", "A?C", "ABBC", False),
    ("text", "??", "AB", True),
    ("text", "*?", "", False),
    ("text", "?*", "é", True),
    ("text", "*B*", "ABC", True),
    ("text", "a*", "ABC", False),               # text keys are case-sensitive
    ("text", "A*", None, False),
    ("text", "A*", "", False),
    ("text", "[AB]*", "A1", False),             # [ ] . ( ) + | ^ $ \ are ordinary characters
    ("text", "[AB]*", "[AB]1", True),
    ("text", "A.C*", "ABC1", False),
    ("text", "A.C*", "A.C1", True),
    ("text", "(A|B)+*", "(A|B)+", True),
    ("text", "^A$*", "^A$", True),
    ("text", "A\\d*", "A\\d1", True),
    ("text", "A\\d*", "A1", False),
    ("text", " A*B ", "AxB", True),             # padding is not significant
    ("text", "A*\nB", "A\nB", True),            # ? and * match any character, newline included
    ("pn", "doe^j*", "DOE^JANE", True),
    ("pn", "DOE^J?NE", "doe^jane", True),
    ("pn", "müller*", "MÜLLER^HANS", True),
    ("pn", "ΟΔΟΣ*", "οδος^α", True),            # final sigma folds like the other sigma
    ("pn", "DOE^JANE^^^", "DOE^JANE", True),    # empty trailing components are not significant
    ("pn", "DOE^JANE", "DOE^JANE^^^", True),
    ("pn", "DO?^*", "DOE", False),
    ("uid", ["1.2.3", "1.2.4"], "1.2.4", True),
    ("uid", ["1.2.3", "1.2.4"], "1.2.5", False),
    ("multi", ["MR", "C?"], ["DX", "CT"], True),
    ("multi", ["MR", "C?"], ["DX", "PT"], False),
    ("date", "20200101-20201231", "20200505", True),
    ("date", "-20191231", "20200505", False),
    ("time", "10-11", "105959", True),
])
def test_wildcard_semantics(kind, pattern, value, expected):
    assert matches(kind, pattern, value) is expected


def _reference(pattern: str, value: str) -> bool:
    """Textbook dynamic programme: row j says whether the pattern so far matches value[:j]."""
    row = [True] + [False] * len(value)
    for c in pattern:
        if c == "*":
            row = list(itertools.accumulate(row, operator.or_))
        else:
            row = [False] + [row[j] and (c == "?" or c == value[j]) for j in range(len(value))]
    return row[-1]


def test_wildcard_matcher_agrees_with_the_textbook_definition():
    rng = random.Random(20240607)
    for _ in range(20_000):
        pattern = "".join(rng.choice("ab*?[.") for _ in range(rng.randint(1, 8)))
        value = "".join(rng.choice("ab[.") for _ in range(rng.randint(1, 9)))
        if pattern.strip("*") == "":
            continue    # universal: always matches, even an empty value
        assert matches("text", pattern, value) is _reference(pattern, value), (pattern, value)


@pytest.mark.parametrize("kind, pattern, last", [("pn" if k == "PatientName" else "text", p, "") for k, p in WORST]
                         + [("text", "*a" * 20 + "*?b?", "b")])     # no literal head or tail to reject on
def test_matcher_cost_is_linear_in_the_values(kind, pattern, last):
    """10^4 worst-case values (64 and 324 characters of one letter) per worst pattern, well within
    the per-query budget of 1 s per 10^4 studies."""
    match = key_matcher(kind, pattern)
    for length in (64, 324):
        values = [("A" if kind == "pn" else "a") * (length - len(last)) + last] * N_STUDIES
        started = time.perf_counter()
        assert not any(match(v) for v in values)
        assert time.perf_counter() - started < (0.5 if length == 64 else 1.5), length


# ----- 10^4 studies, a real association --------------------------------------------------------

def bulk_studies(engine, n: int) -> None:
    """n studies of n/2 patients, one series each, inserted directly (C-STORE would take minutes).
    Odd studies carry the worst values for the patterns above: 64 x "a" descriptions, 64 x "A"
    names."""
    now = datetime.now(timezone.utc)
    with engine.begin() as connection:
        connection.execute(insert(Patient), [
            dict(id=p + 1, patient_id=f"P{p:05d}", issuer="HOSP-A", name=f"PATIENT{p:05d}^TEST",
                 birth_date="19700101", sex="F", created_at=now) for p in range(n // 2)])
        connection.execute(insert(Study), [
            dict(id=i + 1, study_uid=f"1.2.826.0.1.3680043.10.543.{i}", patient_pk=i // 2 + 1,
                 study_date=f"20{i % 20:02d}{i % 12 + 1:02d}01", study_time="101500", accession_number=f"ACC{i:07d}",
                 description="a" * 64 if i % 2 else f"CT CHEST WITHOUT CONTRAST {i:05d} ".ljust(64, "Z"),
                 patient_name="A" * 64 if i % 2 else f"PATIENT{i // 2:05d}^TEST", patient_birth_date="19700101",
                 patient_sex="F", conflicting_instances=0, created_at=now) for i in range(n)])
        connection.execute(insert(Series), [
            dict(id=i + 1, series_uid=f"1.2.826.0.1.3680043.10.543.1.{i}", study_pk=i + 1,
                 modality="CT" if i % 2 else "MR", series_number=1, instance_count=1, total_bytes=100,
                 first_received_at=now, last_received_at=now, state=SeriesState.done, state_changed_at=now)
            for i in range(n)])


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def big(request, tmp_path_factory):
    """A running node (shipped [query] defaults) holding N_STUDIES studies."""
    tmp = tmp_path_factory.mktemp(f"cfind_big_{request.param}")
    url, database = module_database(request.param, tmp)
    engine = make_engine(url)
    upgrade(engine)
    bulk_studies(engine, N_STUDIES)
    engine.dispose()
    config = node_config(tmp, url)
    node = RunningNode(write_toml(tmp / "node.toml", config), config)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        if database:
            _drop_postgres_database(database)


def associate(port: int, *contexts, ae_title: str = "PYNETDICOM", timeout: float = 10):
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for context in contexts or (STUDY_ROOT, PATIENT_ROOT):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="LINKNODE")
    assert assoc.is_established, "no association"
    return assoc


def find(assoc, model=STUDY_ROOT, level="STUDY", **keys) -> tuple[list[Dataset], Dataset | None]:
    """(pending identifiers, final status data set); the final status is None when the SCP did
    not answer within the association's DIMSE timeout."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    identifier.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    found, final = [], None
    for status, ds in assoc.send_c_find(identifier, model):
        if not status:
            break
        if status.Status in (0xFF00, 0xFF01):
            found.append(ds)
        else:
            final = status
    return found, final


def timed_find(port: int, **keys) -> tuple[float, list[Dataset], Dataset | None]:
    assoc = associate(port)
    try:
        started = time.perf_counter()
        found, final = find(assoc, **keys)
        return time.perf_counter() - started, found, final
    finally:
        assoc.release() if assoc.is_established else assoc.abort()


@pytest.mark.parametrize("keyword, pattern", WORST)
def test_worst_wildcards_answer_within_a_second_per_10k_studies(big, keyword, pattern):
    took, found, final = timed_find(big.port, **{keyword: pattern})
    assert final is not None and final.Status == SUCCESS, "no answer"
    assert found == []
    assert took < 1.0 * N_STUDIES / 10_000, f"{took:.2f}s"


def test_worst_wildcards_on_every_key_at_once_and_at_patient_level(big):
    keys = {keyword: pattern for keyword, pattern in reversed(WORST)}
    keys["StudyDescription"] = "*a" * 31 + "*"     # matches the odd studies: the other keys are tried too
    took, found, final = timed_find(big.port, **keys)
    assert final.Status == SUCCESS and found == [] and took < 1.0, f"{took:.2f}s"

    assoc = associate(big.port)
    try:
        started = time.perf_counter()
        found, final = find(assoc, PATIENT_ROOT, "PATIENT", PatientName="*?" * 31 + "*#", PatientID="*?*?*?*?*#")
        assert final.Status == SUCCESS and found == [] and time.perf_counter() - started < 1.0
    finally:
        assoc.release()


def test_a_broad_query_is_cut_at_max_matches_within_the_budget(big):
    """5000 studies match; the shipped limit (1000) is sent, oldest first, then Refused."""
    took, found, final = timed_find(big.port, StudyDescription="CT*", StudyDate="")
    assert len(found) == QuerySettings().max_matches
    dates = [ds.StudyDate for ds in found]
    assert dates == sorted(dates)
    assert final.Status == OUT_OF_RESOURCES and "narrow" in final.ErrorComment
    # Sending the 1000 responses is pynetdicom's cost (about 1 ms each), on top of the matching.
    assert took < 3.0, f"{took:.2f}s"


def test_echo_answers_while_the_worst_queries_run(big):
    """Other associations are not held up: C-ECHOs (each its own association, as a modality
    would) answer quickly while another association runs the worst queries back to back."""
    stop, answered, errors = threading.Event(), [], []

    def hammer():
        try:
            assoc = associate(big.port, timeout=5)
            try:
                while not stop.is_set():
                    for keyword, pattern in WORST:
                        _, final = find(assoc, **{keyword: pattern})
                        answered.append(final is not None)
                        if final is None:
                            return
            finally:
                assoc.release() if assoc.is_established else assoc.abort()
        except Exception as error:          # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        for _ in range(5):
            ae = AE(ae_title="ECHOSCU")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            started = time.perf_counter()
            assoc = ae.associate("127.0.0.1", big.port, ae_title="LINKNODE")
            status = assoc.send_c_echo() if assoc.is_established else None
            took = time.perf_counter() - started
            if assoc.is_established:
                assoc.release()
            assert status and status.Status == 0x0000, "no C-ECHO answer"
            assert took < 0.5, f"C-ECHO took {took:.2f}s"
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert answered and all(answered), "a worst query got no answer"


# ----- the [query] limits ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A node with five studies of patient PL and tight [query] limits."""
    tmp = tmp_path_factory.mktemp("cfind_limits")
    url = f"sqlite:///{tmp / 'node.db'}"
    engine = make_engine(url)
    upgrade(engine)
    from db.store import IdentityStore
    store = IdentityStore(engine)
    uids = [add_study(store, "PL", "HOSP-A", name="LIMIT^LISA", date=f"2020010{n + 1}") for n in range(5)]
    engine.dispose()
    config = node_config(tmp, url, query={"max_matches": 3, "max_key_length": 64, "max_values": 4})
    node = RunningNode(write_toml(tmp / "node.toml", config), config)
    try:
        node.start()
        yield SimpleNamespace(node=node, uids=uids)
    finally:
        node.stop()


def test_more_matches_than_max_matches_end_with_refused_and_a_warning(limited):
    _, found, final = timed_find(limited.node.port, PatientID="PL", StudyDate="")
    assert [ds.StudyDate for ds in found] == ["20200101", "20200102", "20200103"]
    assert final.Status == OUT_OF_RESOURCES
    assert final.ErrorComment == "more than 3 matches, first 3 sent: narrow the query"
    assert "WARNING dicom_node.qrscp: C-FIND STUDY level from PYNETDICOM: 5 matches, only the first 3 sent" \
        in limited.node.log()

    _, found, final = timed_find(limited.node.port, PatientID="PL", StudyDate="20200101-20200103")
    assert len(found) == 3 and final.Status == SUCCESS      # exactly at the limit: all were sent


def test_keys_beyond_the_limits_are_refused_with_a_comment(limited):
    port = limited.node.port
    pattern = "*?" * 15 + "=" + "*?" * 16 + "*"     # 64 characters, two component groups
    _, found, final = timed_find(port, PatientName=pattern + "X")
    assert found == [] and final.Status == 0xC000
    assert final.ErrorComment == "PatientName: 65 characters, more than 64 allowed"
    _, found, final = timed_find(port, PatientName=pattern)
    assert found == [] and final.Status == SUCCESS

    _, found, final = timed_find(port, StudyInstanceUID=limited.uids)         # 5 UIDs
    assert found == [] and final.Status == 0xC000
    assert final.ErrorComment == "StudyInstanceUID: 5 values, more than 4 allowed"
    _, found, final = timed_find(port, StudyInstanceUID=limited.uids[:4])
    assert len(found) == 3 and final.Status == OUT_OF_RESOURCES


class SlowStore:
    """A LinkStore whose study reads wait for `gate` (or sleep), to hold a query mid-way."""

    def __init__(self, store: LinkStore, gate: threading.Event | None = None, sleep_s: float = 0.0):
        self.store, self.gate, self.sleep_s = store, gate, sleep_s

    def find_studies(self, *args, **kwargs):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.sleep_s)
        return self.store.find_studies(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def _event(model=STUDY_ROOT, **keys):
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return SimpleNamespace(request=SimpleNamespace(AffectedSOPClassUID=model), identifier=identifier,
                           is_cancelled=False, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="T")))


def test_a_query_past_timeout_s_ends_with_refused(store):
    for n in range(3):
        add_study(store, "PT", "HOSP-A", date=f"2020010{n + 1}")
    links = LinkStore(store.engine)
    handler = make_find_handler(SlowStore(links, sleep_s=0.3), QuerySettings(timeout_s=0.1))
    results = list(handler(_event(PatientName="*")))
    assert len(results) == 1 and results[0][0].Status == OUT_OF_RESOURCES
    assert results[0][0].ErrorComment == "query ran past 0.1 s: narrow the query"

    handler = make_find_handler(links, QuerySettings(timeout_s=5))
    assert [status for status, _ in handler(_event(PatientName="*"))] == [PENDING] * 3


def test_queries_beyond_max_concurrent_wait_then_are_refused(store):
    add_study(store, "PB", "HOSP-A", date="20200101")
    gate = threading.Event()
    handler = make_find_handler(SlowStore(LinkStore(store.engine), gate=gate),
                                QuerySettings(max_concurrent=1, timeout_s=0.3))
    first: list = []
    thread = threading.Thread(target=lambda: first.extend(handler(_event(PatientID="PB"))), daemon=True)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    second = list(handler(_event(PatientID="PB")))
    assert 0.25 < time.monotonic() - started < 2
    assert len(second) == 1 and second[0][0].Status == OUT_OF_RESOURCES
    assert second[0][0].ErrorComment == "all 1 query slots busy: try again later"
    gate.set()
    thread.join(10)
    # The first query held its turn past timeout_s too (its database read waited for the gate).
    assert len(first) == 1 and first[0][0].Status == OUT_OF_RESOURCES and "ran past" in first[0][0].ErrorComment
    # The turn is free again.
    assert [status for status, _ in handler(_event(PatientID="PB"))] == [PENDING]


def test_shipped_query_settings_are_the_defaults_and_are_checked():
    shipped = load_settings(Path(__file__).resolve().parents[1] / "node.toml")
    assert shipped.query == QuerySettings()
    assert (shipped.query.max_matches, shipped.query.max_key_length) == (1000, 128)
    for bad in ({"max_matches": 0}, {"max_key_length": 0}, {"timeout_s": 0}, {"max_concurrent": 0},
                {"max_values": 0}, {"max_matchez": 1}):
        with pytest.raises(ValidationError):
            QuerySettings(**bad)
