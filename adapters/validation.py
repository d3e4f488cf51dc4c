"""What is wrong with input a pydantic model refused, as `field: what is wrong; ...`: one wording
for the trainer's config (train/config.py) and the gateway's requests (serve/)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

# How pydantic names the member of a union in an error's location: `str`, `list[str]`...
_FORMS = {"str", "int", "float", "bool", "dict", "list", "none"}


def explain_errors(errors: Iterable[Mapping[str, Any]], model: type[BaseModel] | None = None,
                   *, unknown: str = "unknown field (check the spelling)", most: int = 5) -> str:
    """`errors` (of a ValidationError, or FastAPI's RequestValidationError) as `field: what is
    wrong`, joined by "; ": the first `most` different ones, then how many more.

    A field that takes several forms (a text or a list...) gets one part, not one per form; a
    missing one says what it is (its description in `model`); our validators' own sentences
    stand as written, alone when about the whole input; an unknown field says `unknown`. The
    value given follows, shortened, except for a missing or unknown field or a whole section.
    """
    parts = list(dict.fromkeys(_explain(err, model, unknown) for err in errors))  # no repeats
    more = f"; and {len(parts) - most} more" if len(parts) > most else ""
    return "; ".join(parts[:most]) + more


def _explain(err: Mapping[str, Any], model: type[BaseModel] | None, unknown: str) -> str:
    loc = [str(p) for p in err["loc"]]
    forms = next((i for i, p in enumerate(loc) if p in _FORMS or "[" in p), None)
    described = _description(model, loc[:forms])
    kind, ctx = err["type"], err.get("ctx") or {}
    if forms is not None:
        loc, kind = loc[:forms], "forms"
        message = "not one of the forms it takes" + (f" ({described})" if described else "")
    elif kind == "missing" and described:
        message = f"required: {described}"
    else:  # our validators' sentences as written; pydantic's words, where ours are not better
        message = {"value_error": str(ctx.get("error", err["msg"])),
                   "literal_error": f"must be one of {ctx.get('expected', '')}",
                   "extra_forbidden": unknown}.get(kind, err["msg"])
    got = err.get("input")
    if kind not in ("missing", "forms", "extra_forbidden") and not isinstance(got, dict):
        shown = repr(got)
        message += f" (got {shown if len(shown) <= 80 else shown[:76] + ' ...'})"
    return f"{'.'.join(loc)}: {message}" if loc else message


def _description(model: type[BaseModel] | None, loc: list[str]) -> str | None:
    """The description of `model`'s field at `loc`, through nested models."""
    info: FieldInfo | None = None
    current: Any = model
    for name in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        if (info := current.model_fields.get(name)) is None:
            return None
        current = info.annotation
    return info.description if info is not None else None
