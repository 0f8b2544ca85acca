"""C-MOVE and C-GET SCP (Patient Root and Study Root, PATIENT/STUDY/SERIES/IMAGE levels).

What a retrieval selects is `linkage.query.retrieve_selection`: at PATIENT level by a Patient ID,
the person's studies across every confirmed same-patient link (misfiled studies left out); at
lower levels the listed unique keys, a linked prior under its own Patient ID. Instances go out as
they were stored: read from the node's file, sent in the transfer syntax they arrived in when the
receiver accepts it; otherwise converted (compressed pixel data decompressed with pydicom's
handlers, then Explicit or Implicit VR Little Endian as accepted); an instance the receiver takes
in no form counts as a failed sub-operation and is listed in Failed SOP Instance UID List.

C-MOVE sends to the AE titles of [[retrieve.destinations]] only (0xA801 for any other), over a
new association that proposes, per SOP class, the stored transfer syntaxes and the uncompressed
ones. C-GET sends over the requestor's association, on the storage contexts it offered with the
SCP role. pynetdicom keeps the sub-operation counts and sends Pending responses after each
sub-operation and the final Success (0x0000), Warning (0xB000: some failed) or Failure; a
C-CANCEL is checked before each instance and ends the retrieval with Cancel (0xFE00). Refusals:
0xC000 with a comment for a level/model/identifier the node cannot serve, 0xA701 when a retrieval
selects more than [retrieve] max_instances or no turn frees up (max_concurrent) within
query.timeout_s, 0xA702 when the database does not answer.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, StoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet as PATIENT_ROOT_GET
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove as PATIENT_ROOT_MOVE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_ROOT_MOVE
from sqlalchemy.exc import SQLAlchemyError

from db.links import LinkStore
from db.records_linkage import InstanceRecord
from dicom_node.config import RetrieveSettings, Settings
from dicom_node.phi import redact
from dicom_node.qrscp import CANNOT_DECODE, query_keys
from dicom_node.security import BCP195_CIPHERS
from linkage.query import LEVEL_KEYS, Refused, check_keys, retrieve_selection, ticker

log = logging.getLogger("dicom_node.retrieve")

MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
PATIENT_ROOT_LEVELS, STUDY_ROOT_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE"), ("STUDY", "SERIES", "IMAGE")
LEVELS = {PATIENT_ROOT_MOVE: PATIENT_ROOT_LEVELS, PATIENT_ROOT_GET: PATIENT_ROOT_LEVELS,
          STUDY_ROOT_MOVE: STUDY_ROOT_LEVELS, STUDY_ROOT_GET: STUDY_ROOT_LEVELS}
PENDING, CANCEL = 0xFF00, 0xFE00
UNABLE_TO_PROCESS, TOO_MANY_MATCHES, UNABLE_TO_SEND = 0xC000, 0xA701, 0xA702
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
RETRIEVE_CONTEXTS = [(model, DEFAULT_TRANSFER_SYNTAXES) for model in MOVE_MODELS + GET_MODELS]
MAX_CONTEXTS = 128        # presentation contexts one association may propose (PS3.8 9.3.2.2)


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds, None


def store_contexts(instances: list[InstanceRecord]) -> list:
    """What a C-MOVE proposes to its destination: per SOP class one context per stored transfer
    syntax (so it can take the file as it is), then one with the uncompressed syntaxes."""
    stored: dict[str, list[str]] = {}
    for instance in instances:
        syntaxes = stored.setdefault(instance.sop_class_uid, [])
        if instance.transfer_syntax_uid not in syntaxes:
            syntaxes.append(instance.transfer_syntax_uid)
    contexts = []
    for sop_class, syntaxes in stored.items():
        contexts += [build_context(sop_class, ts) for ts in syntaxes if ts not in UNCOMPRESSED]
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    return contexts[:MAX_CONTEXTS]


def as_accepted(path: Path, accepted: dict[str, set[str]]) -> Dataset:
    """The stored instance, as the receiver takes it: unchanged when it accepted the stored transfer
    syntax (or when nothing is known of what it accepted), else decompressed to Explicit VR Little
    Endian when it accepted an uncompressed one (pynetdicom then encodes it as that one)."""
    ds = pydicom.dcmread(path)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    taken = accepted.get(ds.SOPClassUID)
    if taken is None or syntax in taken or not syntax.is_compressed:
        return ds
    if taken & set(UNCOMPRESSED):
        # pydicom's pixel handlers (pylibjpeg, gdcm), to Explicit VR Little Endian. Lossless
        # decompression keeps the SOP Instance UID (PS3.5 8.2: the instance is the same).
        ds.decompress(generate_instance_uid=False)
    return ds


def _accepted_as_scu(assoc) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes on which `assoc` lets this node send C-STORE."""
    accepted: dict[str, set[str]] = {}
    for context in assoc.accepted_contexts:
        if context.as_scu:
            accepted.setdefault(context.abstract_syntax, set()).add(context.transfer_syntax[0])
    return accepted


def client_tls_context(settings: Settings) -> ssl.SSLContext:
    """TLS for C-MOVE destinations marked `tls`: BCP 195 as for the listener, the node's certificate
    as client certificate where one is set, the destination verified against security.tls.ca_file
    (else the system's CAs). Host names are not checked: destinations are configured by address."""
    tls = settings.security.tls
    cafile = settings.resolve(tls.ca_file) if tls.ca_file else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.check_hostname = False
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(settings.resolve(tls.cert_file), settings.resolve(tls.key_file))
    return context


class Retriever:
    """The C-MOVE and C-GET event handlers, sharing the selection, limits and file reading."""

    def __init__(self, store: LinkStore, settings: Settings) -> None:
        self.store = store
        self.limits: RetrieveSettings = settings.retrieve
        self.query = settings.query
        self.storage_dir = settings.storage_dir
        self.log_phi = settings.node.log_phi
        self.destinations = {d.ae_title.strip(): d for d in self.limits.destinations}
        self.turns = threading.BoundedSemaphore(self.limits.max_concurrent)
        self.client_tls = client_tls_context(settings) if any(d.tls for d in self.limits.destinations) else None

    # ----- the selection ----------------------------------------------------------------------

    def _select(self, event, service: str, models) -> list[InstanceRecord]:
        """The instances the request's identifier selects; Refused with the status to answer."""
        model = event.request.AffectedSOPClassUID
        try:
            identifier = event.identifier
        except Exception as error:  # pydicom raises several kinds on a broken identifier
            raise Refused(CANNOT_DECODE, f"identifier cannot be decoded: {error}") from None
        if model not in models:
            raise Refused(UNABLE_TO_PROCESS, f"{service} model {model} is not supported")
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in LEVELS[model]:
            raise Refused(UNABLE_TO_PROCESS, f"query level '{level}' is not supported here")
        keys = query_keys(identifier)
        check_keys(keys, LEVEL_KEYS[level], self.query.max_values, self.query.max_key_length)
        try:
            instances = retrieve_selection(self.store, level, keys,
                                           ticker(self.query.timeout_s, lambda: event.is_cancelled))
        except SQLAlchemyError as error:
            log.error("%s: database unavailable: %s", service, type(error).__name__)
            raise Refused(UNABLE_TO_SEND, "database unavailable") from None
        if len(instances) > self.limits.max_instances:
            raise Refused(TOO_MANY_MATCHES, f"{len(instances)} instances, more than {self.limits.max_instances}:"
                                            " retrieve study by study")
        calling = event.assoc.requestor.ae_title.strip()
        pid = redact(str(keys.get("PatientID") or "") or None, self.log_phi)
        log.info("%s %s level from %s (Patient ID %s): %d instances of %d studies", service, level, calling, pid,
                 len(instances), len({i.study_uid for i in instances}))
        return instances

    def _send(self, event, instances: list[InstanceRecord], accepted) -> Iterator[tuple]:
        """(Pending, dataset) per instance; Cancel when the peer cancelled."""
        for instance in instances:
            if event.is_cancelled:
                log.info("retrieval cancelled by %s", event.assoc.requestor.ae_title.strip())
                yield CANCEL, None
                return
            try:
                yield PENDING, as_accepted(self.storage_dir / instance.path, accepted())
            except (OSError, ValueError, RuntimeError, NotImplementedError) as error:
                # A file that cannot be read or converted: a failed sub-operation, the rest go on.
                log.error("retrieval: instance %s not sent: %s", instance.sop_instance_uid, error)
                # Without file meta pynetdicom cannot send it: a failed sub-operation, listed by UID.
                unsendable = Dataset()
                unsendable.SOPClassUID, unsendable.SOPInstanceUID = instance.sop_class_uid, instance.sop_instance_uid
                yield PENDING, unsendable

    # ----- C-MOVE -----------------------------------------------------------------------------

    def _turn(self, event, service: str, models) -> tuple[list[InstanceRecord], Refused | None]:
        """Take a retrieval turn and select; (instances, None) with the turn held, else ([], why)."""
        if not self.turns.acquire(timeout=self.query.timeout_s):
            return [], Refused(TOO_MANY_MATCHES, f"all {self.limits.max_concurrent} retrieval slots busy: try later")
        try:
            return self._select(event, service, models), None
        except Refused as refused:
            self.turns.release()
            log.warning("%s from %s refused: %s", service, event.assoc.requestor.ae_title.strip(), refused.comment)
            return [], refused

    def handle_move(self, event) -> Iterator:
        destination = self.destinations.get(str(event.move_destination or "").strip())
        if destination is None:
            log.warning("C-MOVE from %s to unknown destination %r (add it under [[retrieve.destinations]])",
                        event.assoc.requestor.ae_title.strip(), event.move_destination)
            yield None, None        # pynetdicom answers 0xA801 Move Destination unknown
            return
        instances, refusal = self._turn(event, "C-MOVE", MOVE_MODELS)
        try:
            captured = {}

            def on_accepted(accepted_event) -> None:
                captured["assoc"] = accepted_event.assoc

            # pynetdicom opens the association to the destination; its accepted contexts are
            # seen through EVT_ACCEPTED, so that each instance is converted only where needed.
            # A refusal is sent after pynetdicom's association with the destination (its only path to
            # a failure with a comment): propose what any storage SCP accepts, so it is not lost.
            kwargs = {"contexts": store_contexts(instances) or StoragePresentationContexts[:MAX_CONTEXTS],
                      "evt_handlers": [(evt.EVT_ACCEPTED, on_accepted)]}
            if destination.tls:
                kwargs["tls_args"] = (self.client_tls, None)
            yield destination.host, destination.port, kwargs
            if refusal is not None:
                yield 1
                yield _failure(refusal.status, refusal.comment)
                return
            yield len(instances)
            yield from self._send(event, instances,
                                  lambda: _accepted_as_scu(captured["assoc"]) if "assoc" in captured else {})
        finally:
            if refusal is None:
                self.turns.release()

    # ----- C-GET ------------------------------------------------------------------------------

    def handle_get(self, event) -> Iterator:
        instances, refusal = self._turn(event, "C-GET", GET_MODELS)
        if refusal is not None:
            yield 1
            yield _failure(refusal.status, refusal.comment)
            return
        try:
            yield len(instances)
            yield from self._send(event, instances, lambda: _accepted_as_scu(event.assoc))
        finally:
            self.turns.release()
