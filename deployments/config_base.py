"""The base of every config model (`args:` and everything under it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Arguments are frozen and reject unknown keys (a misspelt option must fail)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
