"""Schemathesis hooks for tests/test_fuzz_openapi.py (loaded through SCHEMATHESIS_HOOKS).

Generation is kept short: every generation request asks for at most a few tokens, whatever the fuzzer drew (an
absent or null length means "up to the session length", which would make the pass minutes long on a CPU). Every
other field, odd values included, goes through as generated."""
from __future__ import annotations

import schemathesis

MAX_NEW_TOKENS = 4
_LENGTH_FIELDS = {           # path -> the request fields that bound how many tokens it generates
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/generate": ("max_tokens",),
    "/v1/chat/interactive": ("request_output_len",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    body = case.body
    fields = _LENGTH_FIELDS.get(case.operation.path)
    if not fields or not isinstance(body, dict):
        return
    for name in fields:
        value = body.get(name)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > MAX_NEW_TOKENS):
            body[name] = MAX_NEW_TOKENS
    for name in ("min_tokens", "min_new_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_NEW_TOKENS:
            body[name] = MAX_NEW_TOKENS
