"""DICOM over TLS (PS3.15 B.9 / BCP 195) against a real `dicom-node serve`.

Certificates are made here with `cryptography`: a CA, a server certificate for
127.0.0.1/localhost and a client certificate. The node runs with
`security.tls.require_client_cert = true`.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from db.engine import make_engine
from db.store import IdentityStore
from tests.helpers import (
    RunningNode,
    corpus_path,
    dataset_bytes,
    need,
    node_config,
    write_toml,
)

pytestmark = pytest.mark.timeout(120)


# ----- certificates ------------------------------------------------------------------

def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject_cn: str, key, issuer_cert, issuer_key, *, ca: bool = False,
          san: list | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer_key or key).public_key()),
            critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                          crl_sign=False, content_commitment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key=None, cert=None) -> Path:
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    else:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("dicom-node test CA", ca_key, None, None, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("localhost", server_key, ca, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("TESTSCU", client_key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return {
        "ca": _write(out / "ca.crt", cert=ca),
        "server_crt": _write(out / "server.crt", cert=server),
        "server_key": _write(out / "server.key", key=server_key),
        "client_crt": _write(out / "client.crt", cert=client),
        "client_key": _write(out / "client.key", key=client_key),
    }


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory, pki):
    """One TLS node for the module (start-up is the expensive part)."""
    base = tmp_path_factory.mktemp("tlsnode")
    config = node_config(base, security={"tls": {
        "enabled": True, "cert_file": str(pki["server_crt"]), "key_file": str(pki["server_key"]),
        "ca_file": str(pki["ca"]), "require_client_cert": True}})
    node = RunningNode(write_toml(base / "node.toml", config), config)
    node.start()
    yield node
    node.stop()


# ----- clients -----------------------------------------------------------------------

def client_context(pki, *, with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki["ca"]))
    if with_cert:
        context.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    return context


def associate(port: int, context: ssl.SSLContext, *contexts, ae_title: str = "TESTSCU"):
    ae = AE(ae_title=ae_title)
    for abstract in contexts or (Verification,):
        # One transfer syntax, the corpus file's own, so the bytes go out unchanged.
        ae.add_requested_context(abstract, ExplicitVRLittleEndian)
    # connection_timeout also bounds the TLS handshake, so a stuck listener fails the test, not hangs it.
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="LINKNODE", tls_args=(context, "localhost"))


def assert_refused(node: RunningNode, context: ssl.SSLContext, what: str) -> None:
    assoc = associate(node.port, context)
    try:
        assert not assoc.is_established, f"{what}: association was established\n--- node log ---\n{node.log()}"
    finally:
        if assoc.is_established:
            assoc.release()
    # A refused handshake must not hurt the listener.
    assert node.process.poll() is None, f"node died after {what}:\n{node.log()}"


def raw_handshake(port: int, context: ssl.SSLContext) -> str:
    """TLS handshake only; returns the negotiated version or raises ssl.SSLError/OSError."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.do_handshake()
        version = tls.version()
        # TLS 1.3: a missing client certificate is reported after the client's
        # Finished, so read once to see the server's alert.
        tls.settimeout(2)
        try:
            tls.recv(1)
        except TimeoutError:
            pass
        return version


def permissive_server(pki) -> tuple[int, threading.Thread, list]:
    """A plain TLS server that accepts anything: the control that a weak client can connect at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(str(pki["server_crt"]), str(pki["server_key"]))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    errors: list = []

    def serve_once():
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.do_handshake()
        except Exception as error:  # noqa: BLE001 - reported to the test
            errors.append(error)
        finally:
            listener.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    return port, thread, errors


def weak_context(pki, *, tls11: bool = False, cipher: str | None = None) -> ssl.SSLContext:
    context = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if tls11:
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("ALL:@SECLEVEL=0")
        if cipher:
            context.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 suites are not set by set_ciphers
            context.set_ciphers(f"{cipher}:@SECLEVEL=0")
    return context


# ----- tests -------------------------------------------------------------------------

def test_echo_and_store_with_client_certificate(tls_node, pki):
    source = corpus_path("explicit_le")
    assoc = associate(tls_node.port, client_context(pki), Verification, CTImageStorage)
    assert assoc.is_established, f"TLS association with a client certificate failed\n{tls_node.log()}"
    try:
        version = assoc.dul.socket.socket.version()
        assert version in ("TLSv1.2", "TLSv1.3"), version
        echo = assoc.send_c_echo()
        assert echo and echo.Status == 0x0000, f"C-ECHO over TLS: {echo}\n{tls_node.log()}"
        status = assoc.send_c_store(source)
        assert status and status.Status == 0x0000, f"C-STORE over TLS: {status}\n{tls_node.log()}"
    finally:
        assoc.release()

    import pydicom

    sop_uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    engine = make_engine(tls_node.settings.database_url)
    try:
        row = IdentityStore(engine).find_instance(sop_uid)
    finally:
        engine.dispose()
    assert row is not None, f"{sop_uid} acknowledged but not in the database\n{tls_node.log()}"
    stored = tls_node.settings.storage_dir / row.path
    assert stored.is_file(), f"stored file {stored} is missing"
    assert dataset_bytes(stored) == dataset_bytes(source), "stored data set differs from the one sent"


def test_no_client_certificate_is_refused(tls_node, pki):
    context = client_context(pki, with_cert=False)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        raw_handshake(tls_node.port, context)
    assert_refused(tls_node, client_context(pki, with_cert=False), "client without certificate")


def test_tls11_is_refused(tls_node, pki):
    # Control: this client can speak TLS 1.1 to a permissive server, so a
    # failure against the node is the node's refusal, not local OpenSSL policy.
    port, thread, errors = permissive_server(pki)
    try:
        version = raw_handshake(port, weak_context(pki, tls11=True))
    except ssl.SSLError as error:
        pytest.skip(f"local OpenSSL cannot negotiate TLS 1.1 even with a permissive peer: {error} {errors}")
    finally:
        thread.join(10)
    assert version in ("TLSv1", "TLSv1.1"), version

    with pytest.raises(ssl.SSLError):
        raw_handshake(tls_node.port, weak_context(pki, tls11=True))
    assert_refused(tls_node, weak_context(pki, tls11=True), "TLS 1.1 client")


@pytest.mark.parametrize("cipher", ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA"])
def test_non_bcp195_cipher_is_refused(tls_node, pki, cipher):
    """RSA key exchange (no forward secrecy) and CBC suites are outside BCP 195."""
    port, thread, errors = permissive_server(pki)
    try:
        raw_handshake(port, weak_context(pki, cipher=cipher))
    except ssl.SSLError as error:
        pytest.skip(f"local OpenSSL cannot negotiate {cipher} even with a permissive peer: {error} {errors}")
    finally:
        thread.join(10)

    with pytest.raises(ssl.SSLError):
        raw_handshake(tls_node.port, weak_context(pki, cipher=cipher))
    assert_refused(tls_node, weak_context(pki, cipher=cipher), f"client offering only {cipher}")


def test_plain_tcp_association_fails(tls_node):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", tls_node.port, ae_title="LINKNODE")
    assert not assoc.is_established, "a non-TLS association was accepted on the TLS port"
    assert tls_node.process.poll() is None, tls_node.log()


def test_idle_tcp_peer_does_not_block_other_tls_peers(tls_node, pki):
    idle = socket.create_connection(("127.0.0.1", tls_node.port))
    try:
        time.sleep(0.3)  # let the listener accept it
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
        assoc = ae.associate("127.0.0.1", tls_node.port, ae_title="LINKNODE",
                             tls_args=(client_context(pki), "localhost"))
        established = assoc.is_established
        if established:
            assoc.release()
    finally:
        idle.close()
    assert established, "a legitimate TLS peer was not served while another TCP peer sat idle"


def test_node_still_serves_after_refusals(tls_node, pki):
    assoc = associate(tls_node.port, client_context(pki))
    assert assoc.is_established, tls_node.log()
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _dcmtk_has_tls(tool: str) -> bool:
    help_text = subprocess.run([tool, "--help"], capture_output=True, text=True, check=False).stdout
    return "+tls" in help_text


@pytest.mark.dcmtk
def test_dcmtk_echoscu_over_tls(tls_node, pki):
    echoscu = need("echoscu")
    if not _dcmtk_has_tls(echoscu):
        pytest.skip("this DCMTK build has no TLS support (`echoscu --help` lists no +tls)")
    # PEM is DCMTK's default key format (-pem-keys); -pw: the key is not encrypted.
    cmd = [echoscu, "-aet", "ECHOSCU", "-aec", "LINKNODE", "-to", "10",
           "+tls", str(pki["client_key"]), str(pki["client_crt"]), "-pw", "+cf", str(pki["ca"]),
           "127.0.0.1", str(tls_node.port)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, (f"{' '.join(cmd)}\nrc={run.returncode}\n{run.stdout}\n{run.stderr}\n"
                                 f"--- node log ---\n{tls_node.log()}")

    # Same tool, anonymous TLS (no client certificate): refused.
    anon = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", "LINKNODE", "-to", "10", "+tla",
                           "+cf", str(pki["ca"]), "127.0.0.1", str(tls_node.port)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert anon.returncode != 0, f"echoscu without a client certificate succeeded:\n{anon.stdout}{anon.stderr}"
