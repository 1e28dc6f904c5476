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


class StrictRequest(BaseModel):
    # Strict: true, "7" and 1.5 are not integers, 1 and "yes" not booleans.
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _json_numbers(cls, data: Any) -> Any:
        return _whole_numbers(data)
