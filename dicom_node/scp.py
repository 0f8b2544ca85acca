"""Where a C-STORE lands: the pynetdicom application entity and its event handlers.

The handlers only translate between DIMSE and `Ingestor`; all decisions about
an instance are made in `dicom_node.ingest`, the same code `import` uses.
C-FIND (`dicom_node.qrscp`) and C-MOVE/C-GET (`dicom_node.retrieve`) are served by the same AE,
so the same allow-list and TLS apply.
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.sop_class import Verification

from db.links import LinkStore
from dicom_node.config import SecuritySettings, Settings
from dicom_node.connections import ConnectionGuard
from dicom_node.ingest import Ingestor
from dicom_node.qrscp import FIND_CONTEXTS, make_find_handler
from dicom_node.retrieve import RETRIEVE_CONTEXTS, Retriever
from dicom_node.security import AccessPolicy, server_tls_context

log = logging.getLogger("dicom_node.scp")


def handle_echo(event) -> int:
    return 0x0000


def make_store_handler(ingestor: Ingestor):
    def handle_store(event) -> int | Dataset:
        request = event.request
        result = ingestor.ingest(
            event.encoded_dataset(include_meta=False),
            event.context.transfer_syntax,
            sop_class=request.AffectedSOPClassUID,
            sop_instance=request.AffectedSOPInstanceUID,
            calling_ae=event.assoc.requestor.ae_title.strip(),
        )
        if result.ok:
            return 0x0000
        status = Dataset()
        status.Status = int(result.status)
        status.ErrorComment = result.reason[:64]  # LO: 64 characters at most
        return status

    return handle_store


class HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's server, with the TLS handshake moved out of the accept loop.

    pynetdicom completes the handshake in the single thread that accepts
    connections, so one peer that connects and says nothing stalls every
    other sender. Here the handshake runs in the connection's own thread,
    with a time limit, after the connection's first bytes (`ConnectionGuard`).
    """

    handshake_timeout_s = 30.0
    # socketserver's default backlog of 5 drops SYNs under a burst of connections, and a
    # dropped SYN is retried only after a second.
    request_queue_size = 128

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    guard: ConnectionGuard | None = None

    def process_request_thread(self, request, client_address) -> None:
        # A connection gets an association object (and its thread) only once it says something.
        if self.guard is not None and not self.guard.wait_for_first_bytes(request):
            self.shutdown_request(request)
            return
        if self.ssl_context:
            previous = request.gettimeout()
            try:
                request.settimeout(self.handshake_timeout_s)
                request.do_handshake()
                request.settimeout(previous)
            except (OSError, ssl.SSLError) as error:
                log.warning("TLS handshake with %s failed: %s", client_address[0], error)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class ReusePortServer(HandshakeInThreadServer):
    """For receiver processes (dicom_node.receivers): each binds the node's port; the kernel
    spreads new connections over them."""

    def server_bind(self) -> None:
        # pynetdicom's server_bind sets SO_REUSEADDR only (socketserver's allow_reuse_port is not read).
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class CheaplyCopiedContexts(list):
    """The supported presentation contexts, as pynetdicom copies them for each connection.

    pynetdicom deep-copies them per connection: about 120 ms of CPU, holding the interpreter
    lock, for our 173 contexts. A context's only mutable part is its transfer syntax list,
    so copying each context and that list is the same copy in about a millisecond.
    """

    def __deepcopy__(self, memo) -> list:
        copies = []
        for context in self:
            clone = copy.copy(context)
            clone._transfer_syntax = list(context._transfer_syntax)
            copies.append(clone)
        return copies


# pynetdicom accepts the first of these that a proposed context lists. Explicit VR Little Endian
# first: it keeps the value representations a file was written with, and a C-GET or C-MOVE
# receiver that offers it gets instances stored so unchanged (most are stored so).
PREFERRED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]


def make_ae(settings: Settings) -> AE:
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    # pynetdicom counts half-open connections too; the real limit is ConnectionGuard's, so
    # pynetdicom's is set above what the guard lets through.
    ae.maximum_associations = node.max_associations + node.max_pending_connections + 16
    # A large PDU lets senders ship an instance in a few PDUs instead of
    # hundreds of 16 kB ones; pure-Python PDU handling is the cost that matters.
    ae.maximum_pdu_size = node.max_pdu_size
    ae.network_timeout = node.network_timeout_s
    ae.acse_timeout = min(30.0, node.network_timeout_s)
    ae.dimse_timeout = node.network_timeout_s
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        # Both roles may be negotiated: a C-GET requestor takes the SCP role to receive its
        # instances over its own association (PS3.7 D.3.3.4); plain senders propose no roles.
        ae.add_supported_context(context.abstract_syntax, PREFERRED_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for abstract_syntax, transfer_syntaxes in FIND_CONTEXTS + RETRIEVE_CONTEXTS:
        ae.add_supported_context(abstract_syntax, transfer_syntaxes)
    return ae


class StorageSCP:
    """The node's DICOM listener: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET, allow-list, optional TLS."""

    def __init__(self, settings: Settings, ingestor: Ingestor, slots=None, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        node = settings.node
        self.ae = make_ae(settings)
        self.policy = AccessPolicy(settings.security, node.ae_title if node.check_called_ae_title else None)
        self.guard = ConnectionGuard(node.max_associations, node.max_pending_connections,
                                     node.association_setup_timeout_s, shared=slots)
        self.handlers = [
            (evt.EVT_CONN_OPEN, self.guard.on_conn_open),
            (evt.EVT_CONN_CLOSE, self.guard.on_conn_close),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, make_store_handler(ingestor)),
            # Reads on the ingest store's engine: one pool, read-only connections.
            (evt.EVT_C_FIND, make_find_handler(LinkStore(ingestor.store.engine), settings.query)),
        ]
        retriever = Retriever(LinkStore(ingestor.store.engine), settings)
        self.handlers += [(evt.EVT_C_MOVE, retriever.handle_move), (evt.EVT_C_GET, retriever.handle_get)]
        self.tls = server_tls_context(settings.security.tls, settings)
        self.server = None

    def on_requested(self, event) -> None:
        """EVT_REQUESTED: refuse peers the policy does not admit, then take an association slot."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        address = assoc.requestor.address
        refusal = self.policy.refusal(primitive.calling_ae_title, primitive.called_ae_title, address,
                                      getattr(assoc, "raw_ae_titles", None))
        if refusal:
            self.guard.release(assoc)
            log.warning("rejected association from %s: %s", address, refusal[1])
            assoc.acse.send_reject(0x01, 0x01, refusal[0])      # rejected-permanent, service-user
            assoc.kill()
        elif not self.guard.admit(assoc):
            log.warning("rejected association from AE '%s' at %s: %d associations are open (node.max_associations)",
                        primitive.calling_ae_title.strip(), address, self.guard.max_associations)
            assoc.acse.send_reject(0x02, 0x03, 0x02)            # rejected-transient, provider, local limit
            assoc.kill()

    def start(self) -> None:
        node = self.settings.node
        self.server = self.ae.make_server(
            (node.host, node.port), evt_handlers=self.handlers, ssl_context=self.tls,
            server_class=ReusePortServer if self.reuse_port else HandshakeInThreadServer,
        )
        self.server.handshake_timeout_s = min(node.association_setup_timeout_s, node.network_timeout_s)
        self.server.guard = self.guard
        self.server.contexts = CheaplyCopiedContexts(self.server.contexts)
        self.guard.start()
        # What AE.start_server(block=False) does, with our server class.
        threading.Thread(target=self.server.serve_forever, name="dicom-acceptor", daemon=True).start()
        self.ae._servers.append(self.server)  # shutdown() removes it from there
        log.info("listening as %s on %s:%s%s", node.ae_title, node.host, self.port, " (TLS)" if self.tls else "")

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.settings.node.port

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let open associations finish, then abort stragglers.

        An aborted C-STORE was never acknowledged, so the sender still owns it.
        """
        if self.server is None:
            return
        self.guard.stop()
        self.server.shutdown()
        self.server = None
        deadline = time.monotonic() + grace_s
        # Connections that never sent an A-ASSOCIATE-RQ (port probes) are not waited for.
        while any(a.is_established for a in self.ae.active_associations) and time.monotonic() < deadline:
            time.sleep(0.1)
        for assoc in self.ae.active_associations:
            assoc.abort()

    def reload_policy(self, security: SecuritySettings) -> AccessPolicy:
        """Put a new allow-list (`[[security.peers]]`, `require_known_ae`) in force without a restart.

        The new policy is built in full first, so a host that does not resolve raises ValueError
        and the policy in force stays. `on_requested` reads `self.policy` once per request, so
        the single assignment is the swap: a request sees either the old or the new policy.
        TLS and the called AE title check keep what they were started with.
        """
        node = self.settings.node
        policy = AccessPolicy(security, node.ae_title if node.check_called_ae_title else None)
        self.policy = policy
        return policy
