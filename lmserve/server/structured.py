"""Structured-output request fields -> GuidedDecodingParams: OpenAI's `response_format` (json_object, json_schema),
LMDeploy's `regex_schema`, vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and its
newer `structured_outputs` object. Only the shape is checked here;
the grammar itself is compiled (and rejected with a 400 naming the field) by the engine before queueing.

The API half of one feature whose engine half is engine/guided.py (grammar matchers and the logits mask); the
two names follow each side's vocabulary, see that module's docstring."""
from __future__ import annotations

import json
from typing import Any

from lmserve.sampling_params import GuidedDecodingParams, SamplingParamsError
from lmserve.server.errors import APIError

# vLLM's structured_outputs keys -> GuidedDecodingParams fields
_STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                    "json_object": "json_object"}


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    return json.dumps(schema, sort_keys=True)


def _make(param: str, **kwargs: Any) -> GuidedDecodingParams:
    try:
        return GuidedDecodingParams(param=param, **kwargs)
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


def guided_from_request(req: Any) -> GuidedDecodingParams | None:
    """The one constraint a request asks for, or None; two at once is a 400."""
    found: list[GuidedDecodingParams] = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(_make("response_format", json_object=True))
        elif rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                               param="response_format")
            found.append(_make("response_format",
                               json=_schema_text(rf.json_schema.schema_, "response_format")))
        elif rf.type == "regex_schema":
            if not rf.regex_schema:
                raise APIError(400, "response_format.regex_schema is required for type regex_schema",
                               param="response_format")
            found.append(_make("response_format", regex=rf.regex_schema))
    if getattr(req, "guided_json", None) is not None:
        found.append(_make("guided_json", json=_schema_text(req.guided_json, "guided_json")))
    if getattr(req, "guided_regex", None) is not None:
        found.append(_make("guided_regex", regex=req.guided_regex))
    if getattr(req, "guided_choice", None) is not None:
        found.append(_make("guided_choice", choice=tuple(req.guided_choice)))
    if getattr(req, "guided_grammar", None) is not None:
        found.append(_make("guided_grammar", grammar=req.guided_grammar))
    so = getattr(req, "structured_outputs", None)
    if so:
        found.append(_from_structured_outputs(so))
    if len(found) > 1:
        raise APIError(400, f"give one structured-output constraint, got {', '.join(g.param for g in found)}",
                       param=found[1].param)
    return found[0] if found else None


def _from_structured_outputs(so: dict[str, Any]) -> GuidedDecodingParams:
    param = "structured_outputs"
    kwargs: dict[str, Any] = {}
    for key, value in so.items():
        if value in (None, False) or key not in _STRUCTURED_KEYS:
            continue
        if key == "json":
            value = _schema_text(value, param)
        elif key == "choice":
            if not isinstance(value, list):
                raise APIError(400, "structured_outputs.choice must be a list of strings", param=param)
            value = tuple(value)
        elif key == "json_object":
            value = True
        kwargs[_STRUCTURED_KEYS[key]] = value
    if not kwargs:
        raise APIError(400, "structured_outputs needs one of json, regex, choice, grammar, json_object",
                       param=param)
    return _make(param, **kwargs)
