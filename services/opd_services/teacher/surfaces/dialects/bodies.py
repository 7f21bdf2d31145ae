"""Request bodies of the dialects: JSON parsed into a dialect's pydantic model, with text fields that
carry lone surrogates named.

orjson refuses a JSON string escape such as "\\ud800" (a lone surrogate: no Unicode character) with
a parse error that names no field. Such a body is valid JSON to Python's json module, so it is read
with that and the first string holding a lone surrogate is named: `prompt[1]: is not valid
Unicode ...`, a 422 like any other bad field. Bodies that are not JSON, or not UTF-8, stay errors
of `body` (surfaces/common.parse_body).

This module knows no route and no error shape (each dialect renders the InvalidRequest in its own).
"""
from __future__ import annotations

import json

from pydantic import BaseModel

from opd_services.errors import InvalidRequest
from opd_services.teacher.surfaces.common import parse_body


def parse_text_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """parse_body, except that a lone surrogate in a string is a 422 naming that string's field."""
    try:
        return parse_body(raw, model)
    except InvalidRequest as e:
        if e.field != "body" or b"\\u" not in raw:
            raise
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise e from None
        where = _surrogate_at(data, "")
        if where is None:
            raise
        field, at = where
        raise InvalidRequest(field or "body", f"is not valid Unicode: a lone surrogate at character {at}; "
                                              "send UTF-8 text") from None


def _surrogate_at(value, path: str) -> tuple[str, int] | None:
    """The field path and character index of the first lone surrogate in a parsed JSON value."""
    if isinstance(value, str):
        at = next((i for i, c in enumerate(value) if "\ud800" <= c <= "\udfff"), None)
        return None if at is None else (path, at)
    if isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    else:
        return None
    for p, v in items:
        found = _surrogate_at(v, p)
        if found is not None:
            return found
    return None
