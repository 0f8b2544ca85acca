"""The DICOM Conformance Statement (PS3.2 layout), rendered from the code's own tables.

Presentation contexts come from the AE that `serve` runs (`dicom_node.scp.make_ae`), statuses
from the constants the handlers answer with, limits and timeouts from the settings, TLS ciphers
from `dicom_node.security`; only the prose is written here. `dicom-node conformance` prints it,
and tests/test_conformance.py checks that docs/conformance.md is what the code renders now.
"""

from __future__ import annotations

import re

import pynetdicom
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import sop_class
from pynetdicom._globals import APPLICATION_CONTEXT_NAME  # pynetdicom's only application context

from dicom_node import __version__, qrscp, retrieve, security
from dicom_node.config import Settings
from dicom_node.scp import make_ae
from dicom_node.statuses import Status
from linkage.query import LEVEL_KEYS, UNIQUE_KEY

REGENERATE = "dicom-node conformance --defaults --out docs/conformance.md"

# What each C-STORE status means here (the values are dicom_node.statuses.Status).
STORE_MEANING = {
    "SUCCESS": "stored: the file is fsynced and renamed and its row committed (`storage.fsync`), "
               "or an identical copy was already stored",
    "DUPLICATE_SOP_INSTANCE": "another object with this SOP Instance UID is stored "
                              "(`storage.duplicate_policy = \"reject\"`)",
    "OUT_OF_RESOURCES": "disk below `storage.min_free_bytes`, database unavailable, or a data set beyond "
                        "the `node.max_dataset_*` / `max_sequence_depth` limits",
    "SOP_CLASS_MISMATCH": "the data set does not match the SOP Class",
    "CANNOT_PARSE": "the data set cannot be parsed (truncated or malformed)",
    "MISSING_UID": "Study, Series or SOP Instance UID absent",
    "INSTANCE_MISMATCH": "the data set's SOP Instance UID is not the request's",
    "PROCESSING_FAILURE": "unexpected error inside the node",
}

# PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4: the standard meaning of each Q/R status; which of them
# the node answers with is read from the handler modules' constants.
QR_STANDARD = {
    0x0000: "Success: sub-operations or matching complete",
    0xFF00: "Pending: matches or sub-operations are continuing",
    0xFF01: "Pending: matches continuing, optional keys not supported",
    0xFE00: "Cancel: terminated by a C-CANCEL request",
    0xB000: "Warning: sub-operations complete, one or more failures",
    0xA700: "Refused: out of resources",
    0xA701: "Refused: out of resources, unable to calculate the number of matches",
    0xA702: "Refused: out of resources, unable to perform sub-operations",
    0xA801: "Refused: move destination unknown",
    0xA900: "Error: identifier does not match SOP Class",
    0xC000: "Failed: unable to process",
    0xC310: "Failed: unable to process (identifier cannot be decoded)",
    0x0122: "Refused: SOP Class not supported",
}
# When the C-FIND SCP (dicom_node.qrscp) answers with a status, where that is not plain.
FIND_WHEN = {
    0x0000: "every match sent",
    0xFF00: "one per match",
    0xFE00: "the peer sent C-CANCEL",
    0xA700: "database unavailable; past `query.timeout_s`, or no free turn within it "
            "(`query.max_concurrent`); after the first `query.max_matches` matches of a broader query",
    0xC000: "unsupported model or level; a key longer than `query.max_key_length` or with more than "
            "`query.max_values` values",
    0xC310: "the identifier cannot be decoded",
}
# C-MOVE/C-GET statuses that pynetdicom's Q/R service sends by itself, around the handler's answers.
RETRIEVE_BY_PYNETDICOM = {"MOVE": (0x0000, 0xFF00, 0xB000, 0xA801), "GET": (0x0000, 0xFF00, 0xB000)}
RETRIEVE_WHEN = {
    0x0000: "every sub-operation succeeded",
    0xFF00: "after each sub-operation, with the counts",
    0xB000: "one or more sub-operations failed (Failed SOP Instance UID List)",
    0xA801: "the Move Destination is not under `[[retrieve.destinations]]`, or it refused the association",
    0xFE00: "the peer sent C-CANCEL (checked before each instance)",
    0xA701: "more than `retrieve.max_instances` selected; no free turn within `query.timeout_s` "
            "(`retrieve.max_concurrent`)",
    0xA702: "database unavailable",
    0xC000: "unsupported model or level; a level without its unique key, or with a wildcard in it; a key "
            "beyond the `query` limits",
    0xC310: "the identifier cannot be decoded",
}
MATCHING = {"uid": "single value, UID list", "date": "single value, range", "time": "single value, range",
            "text": "single value, wildcard", "pn": "single value, wildcard, case-insensitive",
            "multi": "single value, list, wildcard", "count": "return key only"}
ORDER = ["Success", "Pending", "Cancel", "Warning", "Failure"]


def _category(value: int) -> str:
    """PS3.7 C: the status class a value belongs to."""
    if value == 0x0000:
        return "Success"
    if value in (0xFF00, 0xFF01):
        return "Pending"
    if value == 0xFE00:
        return "Cancel"
    return "Warning" if (value & 0xF000) == 0xB000 or value in (0x0001, 0x0107, 0x0116) else "Failure"


def _keywords_by_uid() -> dict[str, str]:
    return {str(uid): name for name, uid in vars(sop_class).items() if isinstance(uid, UID)}


def sop_name(uid: str, keywords: dict[str, str] | None = None) -> str:
    """pydicom's name; for a UID newer than pydicom's dictionary, pynetdicom's keyword split into words."""
    name = UID(uid).name
    if name != str(uid):
        return name
    keyword = (keywords or _keywords_by_uid()).get(str(uid))
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", keyword) if keyword else str(uid)


def service_of(uid: str) -> str:
    """Verification, Storage, FIND, MOVE, GET, or the pynetdicom service class name."""
    if uid == sop_class.Verification:
        return "Verification"
    service = sop_class.uid_to_service_class(uid).__name__
    if service == "StorageServiceClass":
        return "Storage"
    for operation in ("FIND", "MOVE", "GET"):
        if service == "QueryRetrieveServiceClass" and UID(uid).name.endswith(f"- {operation}"):
            return operation
    return service


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def _statuses(values, when: dict[int, str]) -> list[str]:
    rows = [[f"0x{value:04X}", _category(value), QR_STANDARD.get(value, f"0x{value:04X}"), when.get(value, "")]
            for value in sorted(set(values), key=lambda v: (ORDER.index(_category(v)), v))]
    return _table(["status", "category", "meaning", "when"], rows)


def status_constants(module) -> set[int]:
    """The module's upper-case int constants that are Q/R statuses (PS3.4 C.4)."""
    return {value for name, value in vars(module).items()
            if name.isupper() and type(value) is int and value in QR_STANDARD}


def _levels() -> dict[str, tuple[str, ...]]:
    """Query/Retrieve information model UID -> the levels its handler serves."""
    return {**getattr(qrscp, "LEVELS", {}), **getattr(retrieve, "LEVELS", {})}


def _contexts(settings: Settings) -> dict[str, list]:
    groups: dict[str, list] = {}
    for context in make_ae(settings).supported_contexts:
        groups.setdefault(service_of(context.abstract_syntax), []).append(context)
    return groups


def _transfer_syntaxes(syntaxes) -> list[str]:
    return _table(["transfer syntax", "UID"], [[UID(ts).name, f"`{ts}`"] for ts in syntaxes])


def _role(context) -> str:
    # A supported context with scp_role set accepts a requestor that acts as Storage SCP,
    # i.e. the node sends C-STORE sub-operations over the requestor's association (C-GET).
    return "SCP, and SCU over a C-GET requestor's association" if context.scp_role else "SCP"


def _models(contexts, levels: dict) -> list[str]:
    return _table(["information model", "UID", "levels"],
                  [[sop_name(c.abstract_syntax), f"`{c.abstract_syntax}`", ", ".join(levels.get(c.abstract_syntax, ()))]
                   for c in contexts])


def render(settings: Settings) -> str:
    ae = make_ae(settings)
    node, query, tls = settings.node, settings.query, settings.security.tls
    groups, levels = _contexts(settings), _levels()
    storage, keywords = groups.get("Storage", []), _keywords_by_uid()
    retrieving = [c for service in ("MOVE", "GET") for c in groups.get(service, [])]
    out = [
        "# DICOM Conformance Statement: dicom-node",
        "",
        f"dicom-node {__version__}. Generated from the code by `{REGENERATE}`; the test suite fails "
        "when this file and the code disagree. Values are the defaults; `node.toml` changes them, and "
        "`dicom-node conformance` renders the statement for a site's own settings.",
        "",
        "## 1 Overview",
        "",
        "The node is a storage destination next to a PACS: it stores what it receives as received, "
        "links patients across mismatched Patient IDs, and answers queries for a person's priors. "
        "It has one Application Entity, which accepts associations and does not initiate any"
        + (" other than for C-MOVE sub-operations." if groups.get("MOVE") else "."),
        "",
    ]
    overview = [["Verification", "No", "Yes"]] if "Verification" in groups else []
    if storage:
        overview.append([f"Storage: {len(storage)} SOP classes (section 3.1)",
                         "Yes (retrieve sub-operations)" if retrieving else "No", "Yes"])
    overview += [[sop_name(c.abstract_syntax), "No", "Yes"]
                 for service in ("FIND", "MOVE", "GET") for c in groups.get(service, [])]
    out += _table(["SOP classes", "user of service (SCU)", "provider of service (SCP)"], overview)

    out += [
        "## 2 Networking",
        "",
        "DICOM Upper Layer over TCP/IP (PS3.8), IPv4 and IPv6, optionally over TLS (section 4).",
        "",
        "### 2.1 Application Entity",
        "",
        f"- AE title `{node.ae_title}` (`node.ae_title`), port {node.port} (`node.port`), listening on "
        f"`{node.host}` (`node.host`).",
        "- C-STORE: each instance is written to the file store as received (the data set bytes in the "
        "negotiated transfer syntax, with File Meta Information added) and indexed; a series that has had "
        f"no new instance for {settings.series.stable_after_s:g} s (`series.stable_after_s`) is embedded and "
        "linked in the background. Nothing received is changed or merged.",
        "- C-FIND: answered from the index; a query by Patient ID returns the studies of every ID joined to "
        "it by a link an archivist confirmed (section 3.2).",
    ]
    if retrieving:
        out.append("- " + " and ".join(f"C-{op}" for op in ("MOVE", "GET") if groups.get(op))
                   + ": the stored instances a query selects, by the same rules, sent from the stored files (section 3).")
    out += [
        "",
        "### 2.2 Association policies",
        "",
    ]
    out += _table(["item", "value"], [
        ["Application Context Name", f"`{APPLICATION_CONTEXT_NAME}`"],
        ["Implementation Class UID", f"`{ae.implementation_class_uid}` (pynetdicom {pynetdicom.__version__})"],
        ["Implementation Version Name", f"`{ae.implementation_version_name}`"],
        ["maximum PDU size received", f"{ae.maximum_pdu_size} bytes (`node.max_pdu_size`; 0 = unlimited)"
         if ae.maximum_pdu_size else "unlimited (`node.max_pdu_size = 0`)"],
        ["associations at once", f"{node.max_associations} (`node.max_associations`); further ones are rejected"],
        ["connections still without an A-ASSOCIATE-RQ",
         f"{node.max_pending_connections} (`node.max_pending_connections`); the oldest is closed for a new one"],
        ["A-ASSOCIATE-RQ (and TLS handshake) deadline", f"{node.association_setup_timeout_s:g} s "
         "(`node.association_setup_timeout_s`)"],
        ["ACSE timeout", f"{ae.acse_timeout:g} s"],
        ["DIMSE and network timeout", f"{ae.dimse_timeout:g} s, {ae.network_timeout:g} s (`node.network_timeout_s`)"],
        ["asynchronous operations", "not supported: one operation at a time per association"],
        ["SCP/SCU role selection", "accepted for the storage SOP classes (C-GET)"
         if any(c.scp_role for c in storage) else "not used"],
    ])
    out += [
        "**Acceptance.** The A-ASSOCIATE-RQ is checked before any presentation context: the calling AE "
        "title must be a valid AE title listed under `[[security.peers]]`, from one of its `hosts` (unless "
        "`security.require_known_ae = false`), and the called AE title must be the node's (unless "
        "`node.check_called_ae_title = false`). Every rejection is logged with its reason and the peer's "
        "address. `serve` re-reads the peer list on SIGHUP and when `node.toml` changes.",
        "",
    ]
    out += _table(["A-ASSOCIATE-RJ result", "source", "reason / diagnosis", "when"], [
        ["rejected-permanent", "service-user", f"0x{security.CALLING_AE_NOT_RECOGNISED:02X} calling AE title "
         "not recognised", "calling AE title not on the allow-list, not allowed from this host, or malformed"],
        ["rejected-permanent", "service-user", f"0x{security.CALLED_AE_NOT_RECOGNISED:02X} called AE title "
         "not recognised", f"called AE title is not `{node.ae_title}`, or malformed"],
        ["rejected-transient", "service-provider (presentation)", "0x02 local limit exceeded",
         f"{node.max_associations} associations are open"],
    ])
    out += [
        "**Presentation contexts.** Each proposed context whose abstract syntax is listed in section 3 is "
        "accepted with the first transfer syntax, in the order of the tables below, that the requestor "
        "proposed in it; others are rejected (abstract syntax or transfer syntax not supported).",
        "",
        "## 3 Services",
        "",
    ]

    section = 1
    if storage:
        out += [f"### 3.{section} Storage SCP", ""]
        section += 1
        out += [
            "Conformance level 2 (full): every element is kept, byte for byte as received, including "
            "private elements and digital signatures (which are not verified). An identical re-send is "
            "acknowledged without a second copy; another object under a stored SOP Instance UID is "
            + ("refused with 0x0111" if settings.storage.duplicate_policy == "reject" else
               "stored, and the old file kept under `superseded/`")
            + f" (`storage.duplicate_policy = \"{settings.storage.duplicate_policy}\"`). A data set larger "
            f"than {node.max_dataset_bytes} bytes after inflation (`node.max_dataset_bytes`), with more than "
            f"{node.max_dataset_elements} elements, or with sequences nested deeper than {node.max_sequence_depth} "
            "is refused with 0xA700. A refusal carries an Error Comment saying why.",
            "",
        ]
        out += _table(["status", "category", "meaning"],
                      [[f"0x{int(s):04X}", _category(int(s)), STORE_MEANING.get(s.name, s.name.replace("_", " ").lower())]
                       for s in Status])
        by_syntaxes: dict[tuple, list] = {}
        for context in storage:
            by_syntaxes.setdefault(tuple(context.transfer_syntax), []).append(context)
        for syntaxes, contexts in by_syntaxes.items():
            roles = sorted({_role(c) for c in contexts})
            rows = sorted([[sop_name(c.abstract_syntax, keywords), f"`{c.abstract_syntax}`"]
                           + ([_role(c)] if len(roles) > 1 else []) for c in contexts])
            out += [f"{len(contexts)} SOP classes, each with the {len(syntaxes)} transfer syntaxes below"
                    + (f"; role {roles[0]}." if len(roles) == 1 else "."), ""]
            out += _table(["SOP class", "UID"] + (["role"] if len(roles) > 1 else []), rows)
            out += _transfer_syntaxes(syntaxes)

    finds = groups.get("FIND", [])
    if finds:
        out += [f"### 3.{section} Query/Retrieve SCP: C-FIND", ""]
        section += 1
        out += _models(finds, levels)
        out += ["Transfer syntaxes of these contexts:", ""] + _transfer_syntaxes(finds[0].transfer_syntax)
        out += [
            "A query whose Patient ID is a single value (with Issuer of Patient ID, if given) asks for the "
            "*person*: it matches the studies of that ID and of every ID joined to it by a confirmed link, "
            "and leaves out studies a confirmed link says are another patient's. Each response carries the "
            "study's own Patient ID; Other Patient IDs Sequence (0010,1002) and Other Patient IDs (0010,1000), "
            "when requested, list the person's other IDs. Responses hold the requested keys (unknown ones "
            "empty) plus the Query/Retrieve Level and the unique keys of the level and its parents. "
            f"Limits: {query.max_matches} matches (`query.max_matches`), {query.timeout_s:g} s "
            f"(`query.timeout_s`), {query.max_concurrent} queries matched at once (`query.max_concurrent`), "
            f"keys up to {query.max_key_length} characters and {query.max_values} values.",
            "",
        ]
        for level, keys in LEVEL_KEYS.items():
            rows = [[keyword + (" (unique key)" if UNIQUE_KEY.get(level) == keyword else ""),
                     str(Tag(tag_for_keyword(keyword))), MATCHING.get(kind, kind)] for keyword, (kind, _) in keys.items()]
            out += [f"{level} level keys (any other requested key comes back empty):", ""]
            out += _table(["key", "tag", "matching"], rows)
        out += ["C-FIND statuses:", ""] + _statuses(status_constants(qrscp), FIND_WHEN)

    for operation in ("MOVE", "GET"):
        contexts = groups.get(operation, [])
        if not contexts:
            continue
        out += [f"### 3.{section} Query/Retrieve SCP: C-{operation}", ""]
        section += 1
        out += _models(contexts, levels)
        out += ["Transfer syntaxes of these contexts:", ""] + _transfer_syntaxes(contexts[0].transfer_syntax)
        out += [("The matching instances are sent with C-STORE on a new association to the move destination "
                 "(host and port from `[[retrieve.destinations]]`, TLS where its `tls = true`), which proposes "
                 "per SOP class each stored transfer syntax and the uncompressed ones. An instance goes out in "
                 "the transfer syntax it was stored in where the receiver accepted it, else decompressed (same "
                 "SOP Instance UID); one the receiver takes in no form is a failed sub-operation."
                 if operation == "MOVE" else
                 "The matching instances are sent with C-STORE over the same association: the requestor "
                 "proposes their storage SOP classes with SCP/SCU role selection, itself as SCP. Transfer "
                 "syntaxes as for C-MOVE: as stored where the requestor accepted it, else decompressed."), ""]
        out += [f"C-{operation} statuses:", ""]
        out += _statuses(status_constants(retrieve) | set(RETRIEVE_BY_PYNETDICOM[operation]), RETRIEVE_WHEN)

    if "Verification" in groups:
        syntaxes = groups["Verification"][0].transfer_syntax
        same = storage and set(syntaxes) == set(storage[0].transfer_syntax)
        out += [f"### 3.{section} Verification SCP", "",
                f"`{sop_class.Verification}`, C-ECHO answered 0x0000 (Success) to every admitted peer; "
                + ("the transfer syntaxes of section 3.1." if same else "transfer syntaxes:"), ""]
        out += [] if same else _transfer_syntaxes(syntaxes)
        section += 1
    others = {service: c for service, c in groups.items()
              if service not in ("Verification", "Storage", "FIND", "MOVE", "GET")}
    for service, contexts in others.items():
        out += [f"### 3.{section} {service}", ""]
        out += _table(["SOP class", "UID"], [[sop_name(c.abstract_syntax), f"`{c.abstract_syntax}`"] for c in contexts])
        section += 1

    ciphers = security.BCP195_CIPHERS.split(":")
    out += [
        "## 4 Security",
        "",
        "- **AE title and host allow-list** (section 2.2): `[[security.peers]]`, "
        f"`security.require_known_ae = {str(settings.security.require_known_ae).lower()}`.",
        "- **TLS Secure Transport Connection Profile, BCP 195** (PS3.15 B.9), on the DICOM port when "
        f"`security.tls.enabled` (here {str(tls.enabled).lower()}): TLS 1.2 or newer, no compression, the "
        "server's cipher preference; TLS 1.3 suites as OpenSSL configures them, and for TLS 1.2: "
        + ", ".join(f"`{c}`" for c in ciphers) + ". Client certificates are checked against "
        "`security.tls.ca_file`, and required with `security.tls.require_client_cert`.",
        "- Logs show Patient IDs and names only as pseudonyms unless `node.log_phi = true`.",
        "",
        "## 5 Character sets",
        "",
        "- Storage: any Specific Character Set (0008,0005) is accepted; instances are kept as received, "
        "not converted.",
        "- C-FIND: the identifier is decoded with its Specific Character Set and matched as Unicode. "
        "Responses whose values are all ASCII carry no Specific Character Set (default repertoire); "
        "otherwise Specific Character Set is `ISO_IR 192` (UTF-8).",
        "",
    ]
    out += _dicomweb(settings)
    return "\n".join(out).rstrip("\n") + "\n"


def _dicomweb(settings: Settings) -> list[str]:
    """PS3.2 web services part: the DICOMweb routes as web.dicomweb declares them."""
    from web.dicomweb import router

    kinds = (("/metadata", "WADO-RS metadata (`application/dicom+json`)"),
             ("/rendered", "WADO-RS rendered (`image/jpeg`, `image/png`)"),
             ("/wado", "WADO-URI (`application/dicom`, `image/jpeg`)"))
    rows = []
    for route in router.routes:
        kind = next((k for suffix, k in kinds if route.path.endswith(suffix)), None)
        if kind is None:
            search = route.path.endswith(("/studies", "/series", "/instances"))
            kind = ("QIDO-RS search (`application/dicom+json`)" if search else
                    "WADO-RS retrieve (`multipart/related; type=\"application/dicom\"`)")
        rows.append([f"`{', '.join(sorted(route.methods))} {route.path}`", kind])
    web = settings.web
    return ["## 6 DICOMweb", "",
            f"On the web port ({web.port}, `web.port`; served when `web.enabled`, here "
            f"{str(web.enabled).lower()}), behind the web accounts (HTTP Basic or a session; any role reads) "
            "and audited per request. Searches and retrievals are person-aware as C-FIND and C-MOVE are "
            "(section 3.2): a search by Patient ID finds the studies of every confirmed linked ID. "
            "Instances are sent as stored; a client that asks only for Explicit VR Little Endian gets it "
            "converted. [docs/web.md](web.md#dicomweb) has the details.", ""] + _table(["route", "service"], rows) + [""]
