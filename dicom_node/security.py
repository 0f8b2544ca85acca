"""Who may connect: calling-AE allow-list with optional host check, and TLS.

The allow-list and the called AE title are checked when the A-ASSOCIATE-RQ arrives
(EVT_REQUESTED, `dicom_node.scp`); an unknown peer gets A-ASSOCIATE-RJ "calling AE title
not recognised" (or "called AE title not recognised"), the answers DICOM peers and their
logs understand.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass

from dicom_node.config import SecuritySettings, Settings, TLSSettings

log = logging.getLogger("dicom_node.security")

# BCP 195 (RFC 9325) / DICOM PS3.15 B.9: TLS 1.2+ with AEAD ciphers and forward secrecy.
# TLS 1.3 suites are all acceptable and are configured by OpenSSL itself.
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])


@dataclass(frozen=True)
class PeerRule:
    ae_title: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # empty: any host

    def admits(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def _networks(host: str) -> list:
    """An IP, a CIDR block, or a host name resolved once at start-up."""
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as error:
        raise ValueError(f"security.peers: host '{host}' does not resolve: {error}") from None
    return [ipaddress.ip_network(info[4][0]) for info in infos]


# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4): rejected-permanent, service-user, and why.
CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x03, 0x07


def valid_ae_title(title: str | bytes) -> bool:
    """PS3.5 AE: 1-16 characters of the default repertoire, no backslash, no control characters.
    A title field as sent (bytes) may be padded with spaces, or NULs as some old devices do."""
    if isinstance(title, bytes):
        title = title.rstrip(b"\0 ").decode("latin-1")
    title = title.strip(" ")
    return 0 < len(title) <= 16 and "\\" not in title and all(32 <= ord(c) < 127 for c in title)


class AccessPolicy:
    """Who may associate: a well-formed calling AE title on the allow-list (from an allowed host),
    asking for this node's AE title (unless `called_ae_title` is None: any)."""

    def __init__(self, security: SecuritySettings, called_ae_title: str | None = None) -> None:
        self.require_known_ae = security.require_known_ae
        self.called_ae_title = called_ae_title.strip() if called_ae_title else None
        self.rules: dict[str, list[PeerRule]] = {}
        for peer in security.peers:
            networks = tuple(net for host in peer.hosts for net in _networks(host))
            self.rules.setdefault(peer.ae_title.strip(), []).append(PeerRule(peer.ae_title.strip(), networks))

    def admits(self, calling_ae: str, address: str) -> bool:
        if not self.require_known_ae:
            return True
        return any(rule.admits(address) for rule in self.rules.get(calling_ae.strip(), []))

    def refusal(self, calling_ae: str, called_ae: str, address: str,
                raw_titles: tuple[bytes, bytes] | None = None) -> tuple[int, str] | None:
        """(A-ASSOCIATE-RJ diagnostic, log line) for a request to refuse, or None to go on.
        `raw_titles`: the (called, calling) title fields as sent, where they were seen."""
        raw_called, raw_calling = raw_titles or (called_ae, calling_ae)
        if not valid_ae_title(raw_calling):
            return CALLING_AE_NOT_RECOGNISED, f"calling AE title {raw_calling!r} is not a valid AE title"
        if not valid_ae_title(raw_called):
            return CALLED_AE_NOT_RECOGNISED, f"called AE title {raw_called!r} is not a valid AE title"
        if not self.admits(calling_ae, address):
            return CALLING_AE_NOT_RECOGNISED, f"AE '{calling_ae.strip()}' is not on the allow-list"
        if self.called_ae_title is not None and called_ae.strip() != self.called_ae_title:
            return CALLED_AE_NOT_RECOGNISED, (f"it called AE title {called_ae.strip()!r}, "
                                              f"this node is '{self.called_ae_title}'")
        return None


def server_tls_context(tls: TLSSettings, settings: Settings) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    if not (tls.cert_file and tls.key_file):
        raise ValueError("security.tls: cert_file and key_file are required when TLS is enabled")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(settings.resolve(tls.cert_file), settings.resolve(tls.key_file))
    if tls.require_client_cert:
        if not tls.ca_file:
            raise ValueError("security.tls.require_client_cert needs security.tls.ca_file")
        context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_file:
        context.load_verify_locations(cafile=settings.resolve(tls.ca_file))
    return context
