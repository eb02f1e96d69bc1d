"""Who may do what: client keys (--api-keys) for the API, admin keys (--admin-api-keys) for control endpoints.

Shared by the api_server (middleware.py) and the proxy (proxy/app.py); no torch, no engine.

Control endpoints stop, reconfigure or rewrite a server (terminate, sleep/wakeup, weights, LoRA adapters,
DistServe wiring) or, on the proxy, decide where other users' prompts go (/nodes/add ...). Rules:
  - with admin keys: the caller must send one of them (401 without a key or with an unknown one, 403 with a
    client key). A client key never authorizes a control endpoint.
  - without admin keys: control endpoints answer only to loopback callers (one-host setups, LMDeploy's
    same-host --proxy-url registration); anyone else gets 403.
Every control call that gets through is logged with the caller's address and a key id (`admin-key#2`), never the
key itself.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging

logger = logging.getLogger("lmserve.auth")

CONTROL_PATHS = frozenset({"/terminate", "/sleep", "/wakeup", "/update_weights", "/nodes/add", "/nodes/remove",
                           "/nodes/terminate", "/nodes/terminate_all"})
# NOTE: prefixes and substrings so endpoints other issues add later (DistServe wiring, LoRA load/unload in
# vLLM's and SGLang's spellings, SGLang's /update_weights_from_disk) are guarded the day they appear.
CONTROL_PREFIXES = ("/distserve/", "/update_weights")
CONTROL_SUBSTRINGS = ("lora_adapter", "load_lora", "unload_lora")


def is_control_path(path: str) -> bool:
    path = path.rstrip("/") or "/"
    return (path in CONTROL_PATHS or path.startswith(CONTROL_PREFIXES)
            or any(s in path for s in CONTROL_SUBSTRINGS))


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def bearer_token(headers) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (or Anthropic's `x-api-key: <token>`) from ASGI scope headers
    [(b"name", b"value"), ...]."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def key_index(token: bytes | None, keys: tuple[bytes, ...]) -> int | None:
    """1-based index of `token` in `keys` (constant-time compare against each), or None."""
    if token is None:
        return None
    found = None
    for i, key in enumerate(keys):
        if hmac.compare_digest(token, key):
            found = i + 1
    return found


class Denied(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class AccessPolicy:
    """Decides client and control access from the ASGI scope; built once per app."""

    def __init__(self, api_keys: tuple[str, ...] = (), admin_api_keys: tuple[str, ...] = (), what: str = "server"):
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.admin_keys = tuple(k.encode() for k in admin_api_keys)
        self.what = what

    def startup_message(self) -> str:
        if self.admin_keys:
            return (f"control endpoints of this {self.what} need one of the {len(self.admin_keys)} admin key(s) "
                    "(--admin-api-keys)")
        return (f"control endpoints of this {self.what} (terminate, sleep, weights, nodes ...) answer only to "
                "loopback clients: no --admin-api-keys")

    def client_ok(self, scope) -> bool:
        """The general API gate: any client key, or an admin key (admins may also use the API)."""
        if not self.api_keys:
            return True
        token = bearer_token(scope.get("headers", ()))
        return key_index(token, self.api_keys) is not None or key_index(token, self.admin_keys) is not None

    def check_control(self, scope) -> str:
        """Raises Denied, or returns the key id that authorized the call (for the log)."""
        client = scope.get("client") or (None, None)
        host = client[0]
        token = bearer_token(scope.get("headers", ()))
        if self.admin_keys:
            index = key_index(token, self.admin_keys)
            if index is not None:
                return f"admin-key#{index}"
            if key_index(token, self.api_keys) is not None:
                raise Denied(403, f"{scope['path']} is a control endpoint: a client API key cannot call it; "
                                  "send an admin key (--admin-api-keys)", "admin_key_required")
            raise Denied(401, f"{scope['path']} is a control endpoint: send 'Authorization: Bearer <admin key>' "
                              "(--admin-api-keys)", "invalid_api_key")
        if not is_loopback(host):
            raise Denied(403, f"{scope['path']} is a control endpoint and this {self.what} has no "
                              "--admin-api-keys: it answers only to loopback clients", "loopback_only")
        index = key_index(token, self.api_keys)
        return f"loopback, client-key#{index}" if index is not None else "loopback, no key"

    def log_control(self, scope, key_id: str) -> None:
        client = scope.get("client") or ("?", 0)
        logger.info("control %s %s from %s:%s (%s)", scope.get("method"), scope.get("path"), client[0], client[1],
                    key_id)

    def log_denied(self, scope, denied: Denied) -> None:
        client = scope.get("client") or ("?", 0)
        logger.warning("control %s %s from %s:%s refused (%d %s)", scope.get("method"), scope.get("path"),
                       client[0], client[1], denied.status, denied.code)


class ControlGuard:
    """Pure-ASGI middleware: every control path goes through `policy.check_control` before the app sees it.
    Sits inside the client-key gate, so a caller without any valid key has already had its 401."""

    def __init__(self, app, policy: AccessPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_control_path(scope["path"]):
            return await self.app(scope, receive, send)
        from lmserve.server.errors import error_response
        try:
            key_id = self.policy.check_control(scope)
        except Denied as d:
            self.policy.log_denied(scope, d)
            headers = {"WWW-Authenticate": "Bearer"} if d.status == 401 else None
            return await error_response(d.status, d.message, code=d.code, headers=headers)(scope, receive, send)
        self.policy.log_control(scope, key_id)
        return await self.app(scope, receive, send)
