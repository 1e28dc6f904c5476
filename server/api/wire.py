"""What every dialect's request shapes share: strict types, with JSON's one kind of number."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def _whole_numbers(v: Any) -> Any:
    """JSON has one number type: 1.0 is the integer 1 (JSON Schema's "integer" says the same).

    Strict validation would refuse it for an int field; a float field takes the int as it is.
    """
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_whole_numbers(x) for x in v]
    if isinstance(v, dict):
        return {k: _whole_numbers(x) for k, x in v.items()}
    return v


def one_prompt(v: Any) -> Any:
    """A one-element batch of prompts is that prompt; local clients send one prompt a request."""
    if isinstance(v, list) and v and isinstance(v[0], str | list):
        if len(v) != 1:
            raise ValueError("only one prompt per request is supported; send one request each")
        return v[0]
    return v


class StrictRequest(BaseModel):
    # Strict: true, "7" and 1.5 are not integers, 1 and "yes" not booleans.
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_numbers(cls, data: Any) -> Any:
        return _whole_numbers(data)
