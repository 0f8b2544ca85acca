"""Who may connect: calling-AE allow-list with optional host check, and TLS.

The allow-list is checked when the A-ASSOCIATE-RQ arrives (EVT_REQUESTED); an
unknown peer gets A-ASSOCIATE-RJ "calling AE title not recognised", the answer
DICOM peers and their logs understand.
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


class AccessPolicy:
    def __init__(self, security: SecuritySettings) -> None:
        self.require_known_ae = security.require_known_ae
        self.rules: dict[str, list[PeerRule]] = {}
        for peer in security.peers:
            networks = tuple(net for host in peer.hosts for net in _networks(host))
            self.rules.setdefault(peer.ae_title.strip(), []).append(PeerRule(peer.ae_title.strip(), networks))

    def admits(self, calling_ae: str, address: str) -> bool:
        if not self.require_known_ae:
            return True
        return any(rule.admits(address) for rule in self.rules.get(calling_ae.strip(), []))

    def on_requested(self, event) -> None:
        """pynetdicom EVT_REQUESTED handler: reject peers not on the allow-list."""
        assoc = event.assoc
        calling_ae = assoc.requestor.primitive.calling_ae_title.strip()
        address = assoc.requestor.address
        if not self.admits(calling_ae, address):
            log.warning("rejected association from AE '%s' at %s: not on the allow-list", calling_ae, address)
            # rejected-permanent, service-user, calling AE title not recognised
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()


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
