"""Where the money went: a user's model usage, summed per window, session and model.

What ``GET /admin/users/{user}/usage`` and ``chatkit-gateway usage`` answer::

    {"user": "alice", "workflows": {"wf_support": {
        "windows": {"1m": TOTALS, "1h": TOTALS, "1d": TOTALS},
        "sessions": {"cksess_...": {"1m": TOTALS, ...}},
        "models": {"gpt-5-mini": {"1m": TOTALS, ...}}}}}

    TOTALS = {"calls", "input_tokens" (cached included, as the API reports
              it), "cached_input_tokens", "output_tokens", "total_tokens", "usd"}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.model.budgets import BUDGET_WINDOW_SECONDS, ChargeRecord
from gateway.store.base import Store


def _totals(records: Iterable[ChargeRecord]) -> dict[str, Any]:
    out = {
        "calls": 0,
        "input_tokens": 0,
        "cached_input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "usd": 0.0,
    }
    for record in records:
        charge = record.charge
        out["calls"] += 1
        out["input_tokens"] += charge.input_tokens
        out["cached_input_tokens"] += charge.cached_input_tokens
        out["output_tokens"] += charge.output_tokens
        out["total_tokens"] += charge.tokens
        out["usd"] += charge.usd_micros
    out["usd"] = round(out["usd"] / 1_000_000, 6)
    return out


def _per_window(records: list[ChargeRecord], now: float) -> dict[str, dict[str, Any]]:
    return {
        name: _totals(r for r in records if r.at > now - seconds)
        for name, seconds in BUDGET_WINDOW_SECONDS.items()
    }


def summarise(records: list[ChargeRecord], now: float) -> dict[str, Any]:
    """One workflow's usage by one user (``records``: the last day's charges)."""
    by_session: dict[str, list[ChargeRecord]] = {}
    by_model: dict[str, list[ChargeRecord]] = {}
    for record in records:
        by_session.setdefault(record.session_id, []).append(record)
        by_model.setdefault(record.model, []).append(record)
    return {
        "windows": _per_window(records, now),
        "sessions": {sid: _per_window(rs, now) for sid, rs in by_session.items()},
        "models": {model: _per_window(rs, now) for model, rs in by_model.items()},
    }


async def user_usage(store: Store, workflows: Iterable[str], user: str) -> Mapping[str, Any]:
    """The report for ``user`` in each of ``workflows``. Raises StoreUnavailable."""
    now = await store.now()
    report: dict[str, Any] = {}
    for workflow_id in workflows:
        report[workflow_id] = summarise(await store.budget_charges(workflow_id, user), now)
    return {"user": user, "workflows": report}
