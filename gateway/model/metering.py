"""One model call's accounting: admitted against its budgets, then charged.

:meth:`Metering.open` runs before anything is forwarded: it prices the call
(a model without a price under a dollar budget is refused), reserves its room
in the store (refused with 429 and the wait when a window cannot hold it),
and returns the :class:`MeteredCall` that :meth:`MeteredCall.finish` settles
with what the model reported. Settling runs on in the background: the
request's task may be ending by cancellation (a cut stream).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping

from gateway.errors import BadRequest, RateLimited, StoreUnavailable
from gateway.metrics import Metrics
from gateway.model.budgets import (
    NO_CHARGE,
    RESERVATION_LEASE_SECONDS,
    BudgetDecision,
    BudgetFields,
    BudgetKey,
    BudgetLimit,
    Charge,
    Reservation,
    input_estimate,
    output_reservation,
    parse_body,
)
from gateway.model.prices import Price, Prices
from gateway.model.routes import ModelLabels, ModelRequest, token_kinds
from gateway.model.usage import Usage
from gateway.store.base import ModelGrant, Store

logger = logging.getLogger(__name__)


#: How often a turn's audit looks whether its last model call has settled.
AUDIT_POLL_SECONDS = 1.0


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"


def refusal(limit: BudgetLimit, decision: BudgetDecision, *, what: str) -> BudgetExceeded:
    """The 429 for a refused call or turn: which budget, and when it frees."""
    headers: list[tuple[bytes, bytes]] = []
    if decision.retry_after_ms is None:
        when = "this request could never fit in it"
    else:
        seconds = max(1, -(-decision.retry_after_ms // 1000))
        headers.append((b"retry-after", str(seconds).encode()))
        when = f"retry after {seconds} s"
    return BudgetExceeded(f"{what} would exceed {limit.describe()}: {when}.", headers=headers)


class MeteredCall:
    __slots__ = ("_metering", "call_id", "grant", "key", "model", "price", "reservation")

    def __init__(
        self,
        metering: Metering,
        grant: ModelGrant,
        model: str,
        *,
        price: Price | None,
        key: BudgetKey | None,
        call_id: str,
        reservation: Charge,
    ) -> None:
        self._metering = metering
        self.grant = grant
        self.model = model
        self.price = price
        self.key = key
        self.call_id = call_id
        self.reservation = reservation

    def finish(self, usage: Usage | None, *, answered: bool) -> None:
        """Settle: the usage reported, else (``answered``: a 2xx that ended
        without usage) the reservation, else (an error answer) nothing."""
        self._metering.finish(self, usage, answered=answered)


class Metering:
    def __init__(
        self,
        store: Store,
        *,
        metrics: Metrics,
        prices: Prices | None,
        policies: Mapping[str, BudgetFields],
        labels: ModelLabels,
        audit: bool = False,
        grace_seconds: int = 30,
        replica: str = "",
    ) -> None:
        self._store = store
        self._audit = audit
        self._grace = grace_seconds
        self._replica = replica
        self._metrics = metrics
        self._prices = prices
        # Every workflow's calls are recorded (where the money went), with or
        # without budgets; only those with budgets can be refused.
        self._policies = dict(policies)
        self._limits = {wf: p.budget_limits() for wf, p in self._policies.items()}
        self._labels = labels
        self._settling: set[asyncio.Task[None]] = set()
        self._auditing: set[asyncio.Task[None]] = set()

    async def open(
        self, grant: ModelGrant, request: ModelRequest, caller_body: bytes
    ) -> MeteredCall:
        """Admit the call against its workflow's budgets; raise the refusal."""
        policy = self._policies.get(grant.workflow_id)
        price = self._prices(request.model) if self._prices is not None else None
        # The turn's request id first: a turn's calls are found by it (audit).
        call_id = f"{grant.request_id}.{secrets.token_hex(8)}"
        if policy is None:
            return MeteredCall(
                self, grant, request.model, price=price, key=None, call_id=call_id,
                reservation=NO_CHARGE,
            )  # fmt: skip
        limits = self._limits[grant.workflow_id]
        if policy.usd and price is None:
            raise BadRequest(
                f"The model {request.model!r} has no price, and this workflow has a "
                "dollar budget: it cannot be counted.",
                code="model_not_priced",
                param="model",
            )
        input_tokens = input_estimate(caller_body)
        output_tokens = output_reservation(
            request.route, parse_body(request.body), policy.reserve_output_tokens
        )
        reservation = Charge(
            input_tokens,
            0,
            output_tokens,
            price.estimate(input_tokens, output_tokens) if price is not None else 0.0,
        )
        key = BudgetKey(grant.workflow_id, grant.user, grant.session_id)
        decision = await self._store.reserve_budget(
            Reservation(key, call_id, reservation, limits, request.model, RESERVATION_LEASE_SECONDS)
        )
        if not decision.admitted and decision.refused is not None:
            raise refusal(limits[decision.refused], decision, what="This model call")
        return MeteredCall(
            self, grant, request.model, price=price, key=key, call_id=call_id,
            reservation=reservation,
        )  # fmt: skip

    async def turn_room(self, key: BudgetKey) -> None:
        """Refuse a turn (429) when a budget of its session or user is spent."""
        limits = self._limits.get(key.workflow_id)
        if not limits:
            return
        decision = await self._store.budget_room(key, limits)
        if not decision.admitted and decision.refused is not None:
            raise refusal(limits[decision.refused], decision, what="A new turn")

    def finish(self, call: MeteredCall, usage: Usage | None, *, answered: bool) -> None:
        if usage is not None:
            label = self._labels(call.model)
            for kind, count in token_kinds(usage):
                if count:
                    self._metrics.model_tokens.labels(call.grant.workflow_id, label, kind).inc(
                        count
                    )
        elif answered:
            self._metrics.model_calls_unmetered.labels(call.grant.workflow_id).inc()
        if call.key is None:
            return
        if usage is not None:
            cost = call.price.cost(usage) if call.price is not None else 0.0
            charge = Charge(
                usage.input_tokens, usage.cached_input_tokens, usage.output_tokens, cost
            )
        elif answered:
            charge = call.reservation  # nothing invented: the most it could have used
        else:
            charge = NO_CHARGE
        task = asyncio.ensure_future(self._settle(call, call.key, charge))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, call: MeteredCall, key: BudgetKey, charge: Charge) -> None:
        try:
            await self._store.settle_budget(key, call.call_id, charge, model=call.model)
        except StoreUnavailable as exc:
            # The reservation stays and is charged when its lease ends.
            logger.warning("A model call's charge was not settled: %s", exc)

    def audit_turn(self, key: BudgetKey, request_id: str) -> None:
        """With GATEWAY_AUDIT_MODEL_USAGE: once the turn's token has died (its
        grace is over) and its last model call has settled, append its usage
        to the audit stream. Runs on in the background."""
        if not self._audit:
            return
        task = asyncio.ensure_future(self._audit_turn(key, request_id))
        self._auditing.add(task)
        task.add_done_callback(self._auditing.discard)

    async def _audit_turn(self, key: BudgetKey, request_id: str) -> None:
        prefix = request_id + "."
        # No call can start after the grace; those in flight then settle
        # (or their leases end, which charges them).
        await asyncio.sleep(self._grace + 1)
        try:
            waited = 0.0
            while waited < RESERVATION_LEASE_SECONDS:
                flight = await self._store.calls_in_flight(key.workflow_id, key.user)
                if not any(call.startswith(prefix) for call in flight):
                    break
                await asyncio.sleep(AUDIT_POLL_SECONDS)
                waited += AUDIT_POLL_SECONDS
            records = [
                r
                for r in await self._store.budget_charges(key.workflow_id, key.user)
                if r.call_id.startswith(prefix)
            ]
            charges = [r.charge for r in records]
            usage: dict[str, float] = {
                "calls": len(charges),
                "input_tokens": sum(c.input_tokens for c in charges),
                "cached_input_tokens": sum(c.cached_input_tokens for c in charges),
                "output_tokens": sum(c.output_tokens for c in charges),
                "total_tokens": sum(c.tokens for c in charges),
                "usd": round(sum(c.usd_micros for c in charges) / 1_000_000, 6),
            }
            await self._store.audit_usage(
                session_id=key.session_id, replica=self._replica, usage=usage
            )
        except StoreUnavailable as exc:
            logger.warning("A turn's model usage was not audited: %s", exc)

    async def close(self) -> None:
        """Wait for charges being settled; audits still waiting out a grace
        are dropped (a shutdown does not wait for them)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        for task in self._auditing:
            task.cancel()
        if self._auditing:
            await asyncio.gather(*self._auditing, return_exceptions=True)
