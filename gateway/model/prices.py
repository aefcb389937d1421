"""What model tokens cost: a table of USD per million tokens, by model.

The gateway ships one (``prices.json`` beside this module, with the date of
its figures); ``GATEWAY_MODEL_PRICES`` names a file that replaces it
wholesale, same format::

    {"date": "YYYY-MM-DD",
     "models": {"gpt-5-mini": {"input": 0.25, "cached_input": 0.025, "output": 2.0}}}

A dated snapshot name (``gpt-5-mini-2025-08-07``) falls back to its model's
entry. A model the table does not know has no price: under a dollar budget
such a call is refused, never counted as free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ConfigError
from gateway.model.usage import Usage

_SNAPSHOT = re.compile(r"^(?P<model>.+)-\d{4}-\d{2}-\d{2}$")


class _Price(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    input: float = Field(ge=0)
    cached_input: float = Field(ge=0)
    output: float = Field(ge=0)


class _Table(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    source: str = ""
    models: dict[str, _Price]


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens of each kind; equally, micro-dollars per token."""

    input: float
    cached_input: float
    output: float

    def cost(self, usage: Usage) -> float:
        """What ``usage`` cost, in micro-dollars (USD x 10^6)."""
        return (
            usage.uncached_input_tokens * self.input
            + usage.cached_input_tokens * self.cached_input
            + usage.output_tokens * self.output
        )

    def estimate(self, input_tokens: int, output_tokens: int) -> float:
        """A reservation's price, in micro-dollars: every input token at the
        uncached price (the cache is known only afterwards)."""
        return input_tokens * self.input + output_tokens * self.output


class Prices:
    """A price table, looked up by model name."""

    def __init__(self, date: str, models: dict[str, Price]) -> None:
        self.date = date
        self._models = models

    def __call__(self, model: str) -> Price | None:
        price = self._models.get(model)
        if price is None:
            snapshot = _SNAPSHOT.match(model)
            if snapshot is not None:
                price = self._models.get(snapshot["model"])
        return price

    @classmethod
    def parse(cls, text: str, *, where: str) -> Prices:
        try:
            table = _Table.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"{where}: not a price table: {_first_line(exc)}") from None
        return cls(
            table.date,
            {name: Price(p.input, p.cached_input, p.output) for name, p in table.models.items()},
        )

    @classmethod
    def load(cls, path: str | None) -> Prices:
        """The table in ``path`` (GATEWAY_MODEL_PRICES), else the shipped one."""
        if path is None:
            shipped = resources.files("gateway.model").joinpath("prices.json").read_text()
            return cls.parse(shipped, where="the shipped price table")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"GATEWAY_MODEL_PRICES: cannot read {path}: {exc.strerror}") from None
        return cls.parse(text, where=f"GATEWAY_MODEL_PRICES ({path})")


def _first_line(exc: Any) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
