"""A throw-away PKI for the TLS tests, made with `cryptography`: a CA, certificates it signs for 127.0.0.1 (server
and client use), and a second, untrusted CA for "wrong certificate" cases; a uvicorn-in-a-thread runner with TLS. No test functions
here."""
from __future__ import annotations

import datetime
import ipaddress
import os
import threading

import uvicorn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_proxy_fakes import ServerThread, free_port


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: str, stem: str, key, cert) -> tuple[str, str]:
    key_path, cert_path = os.path.join(directory, f"{stem}.key"), os.path.join(directory, f"{stem}.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class CertAuthority:
    def __init__(self, directory: str, name: str = "lmserve test CA"):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=7))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))
        stem = name.replace(" ", "_")
        _, self.ca_path = _write(directory, stem, self.key, self.cert)

    def issue(self, stem: str, hosts: tuple[str, ...] = ("127.0.0.1",)) -> tuple[str, str]:
        """(keyfile, certfile) for a leaf valid as server and client for `hosts` (IPs or DNS names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return _write(self.directory, stem, key, cert)


class TLSServerThread(ServerThread):
    """test_proxy_fakes.ServerThread with uvicorn's ssl arguments (https when given) and a chosen host."""

    def __init__(self, app, host: str = "127.0.0.1", **ssl_kwargs):
        self.app, self.port, self.host = app, free_port(), host
        self.scheme = "https" if ssl_kwargs else "http"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=1, **ssl_kwargs))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"
