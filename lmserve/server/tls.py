"""TLS for the api_server and the proxy: flags (or LMDeploy's `--ssl` + SSL_KEYFILE / SSL_CERTFILE environment
spelling) -> uvicorn's ssl arguments, and the client-side context the proxy (and a registering api_server) uses
to verify https peers and present its own certificate. No torch, no engine.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

ENV_KEYFILE, ENV_CERTFILE, ENV_CA_CERTS = "SSL_KEYFILE", "SSL_CERTFILE", "SSL_CA_CERTS"


@dataclass(frozen=True)
class TLSFiles:
    keyfile: str | None = None
    certfile: str | None = None
    ca_certs: str | None = None     # server side: client certificates must be signed by this CA

    @property
    def enabled(self) -> bool:
        return bool(self.keyfile and self.certfile)


def resolve_tls(keyfile: str | None, certfile: str | None, ca_certs: str | None, use_env: bool = False) -> TLSFiles:
    """Flags win; with `use_env` (LMDeploy's `--ssl`) missing ones come from SSL_KEYFILE / SSL_CERTFILE /
    SSL_CA_CERTS. Raises ValueError naming the flag for half a configuration or a missing file."""
    if use_env:
        keyfile = keyfile or os.environ.get(ENV_KEYFILE)
        certfile = certfile or os.environ.get(ENV_CERTFILE)
        ca_certs = ca_certs or os.environ.get(ENV_CA_CERTS)
        if not (keyfile and certfile):
            raise ValueError(f"--ssl needs --ssl-keyfile/--ssl-certfile or the {ENV_KEYFILE} and {ENV_CERTFILE} "
                             "environment variables")
    if bool(keyfile) != bool(certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    if ca_certs and not keyfile:
        raise ValueError("--ssl-ca-certs (client certificates) needs --ssl-keyfile and --ssl-certfile")
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile), ("--ssl-ca-certs", ca_certs)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag}: no such file: {path}")
    return TLSFiles(keyfile or None, certfile or None, ca_certs or None)


def uvicorn_ssl_kwargs(tls: TLSFiles) -> dict:
    if not tls.enabled:
        return {}
    kwargs = {"ssl_keyfile": tls.keyfile, "ssl_certfile": tls.certfile}
    if tls.ca_certs:
        kwargs.update(ssl_ca_certs=tls.ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kwargs


def client_context(ca_certs: str | None = None, certfile: str | None = None,
                   keyfile: str | None = None) -> ssl.SSLContext:
    """Verifies servers against `ca_certs` (the system store when None) and presents `certfile` when given."""
    ctx = ssl.create_default_context(cafile=ca_certs)
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx
