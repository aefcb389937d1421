"""Token and dollar budgets: what a workflow's policy allows, and what a call reserves.

In a workflow's ``policy`` (``GATEWAY_WORKFLOWS``)::

    {"tokens": {"user": {"1d": 200000}, "session": {"1h": 50000}},
     "usd": {"user": {"1d": 2.5}},
     "reserve_output_tokens": 4096}

Each is an exact sliding window of sums (``1d`` is the last 24 hours) over
the model calls of one session, or of one user of that workflow. A call is
admitted only if, in every window, what was spent plus what calls in flight
reserved plus its own reservation fits; it is then charged what the model
reports (a call that ends without usage: its reservation).

A tokens budget counts ``input_tokens + output_tokens`` as the API reports
them; a dollar budget prices usage with :mod:`gateway.model.prices`.
Amounts cross the store as integers (tokens) and micro-dollars (floats).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.model.usage import CHAT, RESPONSES

BudgetScope = Literal["session", "user"]
BudgetWindow = Literal["1m", "1h", "1d"]
BUDGET_WINDOW_SECONDS: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
#: The longest window: how long a call's charge is kept.
LONGEST_WINDOW_SECONDS = 86400
#: A reservation not settled within this long (its replica died mid-call) is
#: charged in full by the next call that looks, and forgotten.
RESERVATION_LEASE_SECONDS = 3600
DEFAULT_RESERVE_OUTPUT_TOKENS = 4096


class BudgetFields(BaseModel):
    """The budget part of a workflow's policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: dict[BudgetScope, dict[BudgetWindow, int]] = Field(default_factory=dict)
    usd: dict[BudgetScope, dict[BudgetWindow, float]] = Field(default_factory=dict)
    #: A call's output reservation when its request sets no cap.
    reserve_output_tokens: int = Field(default=DEFAULT_RESERVE_OUTPUT_TOKENS, ge=1, le=10_000_000)

    @field_validator("tokens", "usd")
    @classmethod
    def _positive_budgets(
        cls, value: dict[BudgetScope, dict[BudgetWindow, float]]
    ) -> dict[BudgetScope, dict[BudgetWindow, float]]:
        for scope, windows in value.items():
            for window, amount in windows.items():
                if not amount > 0 or not math.isfinite(amount):
                    raise ValueError(f"{scope}.{window} must be positive (got {amount})")
        return value

    @property
    def has_budgets(self) -> bool:
        return bool(self.tokens or self.usd)

    def budget_limits(self) -> tuple[BudgetLimit, ...]:
        """Every window, in the form the store checks."""
        out = [
            BudgetLimit("tokens", scope, BUDGET_WINDOW_SECONDS[window], amount)
            for scope, windows in self.tokens.items()
            for window, amount in windows.items()
        ]
        out += [
            BudgetLimit("usd", scope, BUDGET_WINDOW_SECONDS[window], amount * 1_000_000)
            for scope, windows in self.usd.items()
            for window, amount in windows.items()
        ]
        return tuple(out)


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """One window: ``kind`` tokens or usd (then ``limit`` in micro-dollars)."""

    kind: Literal["tokens", "usd"]
    scope: BudgetScope
    seconds: int
    limit: float

    def describe(self) -> str:
        window = next(n for n, s in BUDGET_WINDOW_SECONDS.items() if s == self.seconds)
        amount = (
            f"{self.limit / 1_000_000:g} USD" if self.kind == "usd" else f"{self.limit:g} tokens"
        )
        return f"the {self.scope}'s {window} budget of {amount}"


@dataclass(frozen=True, slots=True)
class Charge:
    """What a call is charged, or reserves: tokens by kind and micro-dollars."""

    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    usd_micros: float

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


#: What a call that used nothing (the model answered an error) is charged.
NO_CHARGE = Charge(0, 0, 0, 0.0)


def output_reservation(route: str, body: dict[str, object], default: int) -> int:
    """The output a call may produce: its own cap, else the policy's default."""
    names: tuple[str, ...] = ("max_output_tokens",) if route == RESPONSES else ()
    if route == CHAT:
        names = ("max_completion_tokens", "max_tokens")
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def input_estimate(body: bytes) -> int:
    """The input a call may count: its body's bytes / 4, rounded up."""
    return -(-len(body) // 4)


def parse_body(body: bytes) -> dict[str, object]:
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


@dataclass(frozen=True, slots=True)
class BudgetKey:
    """Whose budgets a call counts against: per-user budgets are per workflow."""

    workflow_id: str
    user: str
    session_id: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """A model call's claim on its budgets: room for ``charge`` in every one
    of ``limits``, held for ``lease_seconds`` unless the call settles first."""

    key: BudgetKey
    call_id: str
    charge: Charge
    limits: tuple[BudgetLimit, ...]
    model: str
    lease_seconds: int


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """Admitted, or refused by ``limits[refused]`` with the wait until it
    could fit (None: it never could)."""

    admitted: bool
    refused: int | None = None
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ChargeRecord:
    """One settled call, as the store keeps it for the window (and for reports)."""

    at: float  # unix seconds
    session_id: str
    model: str
    charge: Charge
    call_id: str = ""


@dataclass(frozen=True, slots=True)
class Spent:
    """An amount in a window (of charges or of reservations) for one session."""

    at_us: int
    session_id: str
    tokens: float
    usd_micros: float


def decide(
    now_us: int,
    charges: list[Spent],
    flight: list[Spent],
    limits: tuple[BudgetLimit, ...],
    *,
    session_id: str,
    need_tokens: float,
    need_usd: float,
    check: bool,
) -> BudgetDecision:
    """The embedded store's decision; ``lua/budget_reserve.lua`` makes the
    same one in Redis (the contract tests hold them to each other).

    ``charges`` oldest first. ``check`` (a turn's admission) asks only
    whether any room is left.
    """
    refused, worst = 0, -2
    for index, limit in enumerate(limits, start=1):
        length = limit.seconds * 1_000_000
        in_scope = [
            c
            for c in charges
            if c.at_us > now_us - length and (limit.scope == "user" or c.session_id == session_id)
        ]
        tokens = limit.kind == "tokens"
        amounts = [c.tokens if tokens else c.usd_micros for c in in_scope]
        spent = sum(amounts)
        reserved = sum(
            (r.tokens if tokens else r.usd_micros)
            for r in flight
            if limit.scope == "user" or r.session_id == session_id
        )
        need = need_tokens if tokens else need_usd

        def fits(left: float, limit: float = limit.limit, need: float = need) -> bool:
            return left < limit if check else left + need <= limit

        if fits(spent + reserved):
            continue
        wait = -1
        if need <= limit.limit and (not check or reserved < limit.limit):
            freed = 0.0
            for charge, amount in zip(in_scope, amounts, strict=True):
                freed += amount
                if fits(spent - freed + reserved):
                    wait = charge.at_us + length - now_us
                    break
            if wait < 0:
                wait = 1_000_000
        if worst != -1 and (wait == -1 or wait > worst):
            refused, worst = index, wait
    if not refused:
        return BudgetDecision(True)
    return BudgetDecision(False, refused - 1, None if worst == -1 else -(-worst // 1000))
