"""JSON schemas for the structured-output tests: nested objects, arrays, enums, anyOf, bounded numbers,
required/optional properties, string patterns. Strings carry maxLength and arrays maxItems so that a 135M model
sampling at temperature 1.0 finishes inside the tests' max_tokens."""
from __future__ import annotations

S = {"type": "string", "maxLength": 12}
NAME = {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}
INT = {"type": "integer", "minimum": 0, "maximum": 100}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def arr(items: dict, lo: int = 0, hi: int = 3) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


SCHEMAS: list[dict] = [
    obj({"name": S, "age": INT}),
    obj({"city": S}),
    obj({"ok": {"type": "boolean"}}),
    obj({"x": {"type": "number", "minimum": -10, "maximum": 10}}),
    obj({"n": {"type": "integer", "minimum": 1, "maximum": 9}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"size": {"type": "string", "enum": ["S", "M", "L", "XL"]}, "qty": INT}),
    obj({"tags": arr(S)}),
    obj({"scores": arr(INT, 1, 4)}),
    obj({"user": obj({"id": INT, "name": NAME})}),
    obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}),
    obj({"people": arr(obj({"name": NAME, "age": INT}), 1, 2)}),
    obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}}),
    obj({"id": {"anyOf": [S, INT]}}),
    obj({"name": S, "nickname": S}, required=["name"]),
    obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}, "rating": INT},
        required=["title"]),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}, "unit": {"enum": ["C", "F"]}}),
    obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
         "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
    obj({"matrix": arr(arr(INT, 1, 2), 1, 2)}),
    obj({"status": {"const": "done"}, "count": INT}),
    obj({"kind": {"enum": ["a", "b"]}, "data": {"anyOf": [obj({"x": INT}), obj({"y": S})]}}),
    obj({"flag": {"type": "boolean"}, "note": S}, required=["flag"]),
    obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"items": arr(obj({"sku": {"type": "string", "pattern": "^[A-Z0-9]{4}$"}, "qty": INT}), 1, 3)}),
    obj({"address": obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, ["city"])}),
    obj({"first": NAME, "last": NAME, "middle": NAME}, required=["first", "last"]),
    obj({"ids": arr({"type": "integer", "minimum": 1, "maximum": 1000}, 2, 3)}),
    obj({"pair": {"type": "array", "prefixItems": [S, INT], "items": False, "minItems": 2, "maxItems": 2}}),
    obj({"empty": obj({})}),
    obj({"nullable": {"anyOf": [S, {"type": "null"}]}}),
    obj({"nothing": {"type": "null"}}),
    obj({"level": {"type": "integer", "enum": [1, 2, 3]}}),
    obj({"weights": arr({"type": "number", "minimum": 0, "maximum": 1}, 1, 3)}),
    obj({"meta": obj({"version": {"type": "string", "pattern": "^[0-9]\\.[0-9]$"}, "stable": {"type": "boolean"}})}),
    obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    obj({"choice": {"anyOf": [{"const": "left"}, {"const": "right"}]}}),
    obj({"event": obj({"name": S, "attendees": arr(NAME, 0, 2)}), "public": {"type": "boolean"}}),
    obj({"grade": {"type": "string", "enum": ["A", "B", "C", "D", "F"]}, "student": NAME}),
    obj({"price": {"type": "number", "minimum": 0, "maximum": 1000}, "currency": {"enum": ["USD", "EUR"]}}),
    obj({"steps": arr(obj({"n": INT, "done": {"type": "boolean"}}), 1, 2)}),
    obj({"tree": obj({"value": INT, "children": arr(obj({"value": INT}), 0, 2)})}),
    obj({"percent": {"type": "integer", "minimum": 0, "maximum": 100}, "label": S}, required=["percent"]),
    obj({"country": {"type": "string", "pattern": "^[A-Z]{2}$"}, "population": {"type": "integer", "minimum": 0,
                                                                                "maximum": 2000000000}}),
    obj({"word": {"type": "string", "minLength": 2, "maxLength": 6}}),
    obj({"mode": {"enum": ["fast", "slow", None]}}),
    obj({"point": obj({"x": INT, "y": INT, "z": INT}, ["x", "y"])}),
    obj({"ok": {"type": "boolean"}, "errors": arr(S, 0, 2), "warnings": arr(S, 0, 2)}, required=["ok"]),
    obj({"version": {"type": "integer", "minimum": 1, "maximum": 5}, "features": arr({"enum": ["a", "b", "c"]}, 1, 3)}),
    obj({"range": obj({"min": {"type": "number", "minimum": 0, "maximum": 5},
                       "max": {"type": "number", "minimum": 5, "maximum": 10}})}),
    {"type": "array", "items": INT, "minItems": 1, "maxItems": 3},
    {"enum": ["alpha", "beta", "gamma"]},
    {"type": "integer", "minimum": 10, "maximum": 99},
]
