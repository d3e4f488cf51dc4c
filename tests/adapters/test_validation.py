"""One wording of validation errors for the trainer's config and the gateway's requests."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorastack.adapters.validation import explain_errors


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["fast", "slow"] = "fast"
    size: int = Field(1, ge=1)
    label: str = Field(description="what the inner thing is called")


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner
    text: str | list[str] = Field("", description="one text or several")
    name: str = "x"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value.startswith("-"):
            raise ValueError("name must not start with a dash")
        return value

    @model_validator(mode="after")
    def _whole(self):
        if self.name == "both" and self.inner.size > 1:
            raise ValueError("a name of both needs inner.size 1")
        return self


def explain(raw: dict, **kwargs) -> str:
    with pytest.raises(ValidationError) as err:
        Outer.model_validate(raw)
    return explain_errors(err.value.errors(), Outer, **kwargs)


def test_each_kind_of_error_says_what_is_wrong():
    assert explain({"inner": {}}) == "inner.label: required: what the inner thing is called"
    assert explain({"inner": {"label": "a", "mode": "quick"}}) == \
        "inner.mode: must be one of 'fast' or 'slow' (got 'quick')"
    assert explain({"inner": {"label": "a", "size": 0}}) == \
        "inner.size: Input should be greater than or equal to 1 (got 0)"
    assert explain({"inner": {"label": "a"}, "name": "-x"}) == \
        "name: name must not start with a dash (got '-x')"
    assert explain({"inner": {"label": "a", "size": 2}, "name": "both"}) == \
        "a name of both needs inner.size 1"  # about the whole input: no field, no value
    assert explain({"inner": {"label": "a"}, "nme": 3}, unknown="unknown setting") == \
        "nme: unknown setting"


def test_a_field_of_several_forms_is_one_part():
    assert explain({"inner": {"label": "a"}, "text": [1, 2, 3]}) == \
        "text: not one of the forms it takes (one text or several)"


def test_long_values_are_shortened_and_many_errors_counted():
    long = explain({"inner": {"label": "a", "mode": "m" * 200}})
    assert long.endswith("m ...)") and len(long) < 140
    many = explain({"inner": {"label": "a"}, **{f"x{i}": i for i in range(8)}})
    assert many.count("unknown field") == 5 and many.endswith("; and 3 more")


def test_fastapi_errors_read_the_same():
    errors = [{"type": "missing", "loc": ("query", "limit"), "msg": "Field required",
               "input": None},
              {"type": "int_parsing", "loc": ("path", "n"), "msg": "Input should be a valid "
               "integer, unable to parse string as an integer", "input": "x"}]
    assert explain_errors(errors) == ("query.limit: Field required; path.n: Input should be a "
                                      "valid integer, unable to parse string as an integer "
                                      "(got 'x')")
