"""The admission step in process: what the gatekeeper decides, raises and counts.

The embedded store with a clock the test moves decides exactly as the
contract suite proves Redis does, so the window, expiry and report-only mode
run here in milliseconds; an outage is a flag on the store. The end-to-end
counterparts are in test_proxy.py and test_replicas.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.admission import Gatekeeper
from gateway.auth import SecretHasher
from gateway.errors import AuthError, RateLimited, StoreUnavailable
from gateway.metrics import Metrics
from gateway.revocation import Revoker
from gateway.store.base import SessionRecord
from tests.doubles import FakeClock, OutageStore

HASHER = SecretHasher(b"gatekeeper-pepper")
SECRET = b"ek_gatekeeper_secret"
WINDOW = 60
LIMIT = 2


@dataclass
class Kit:
    clock: FakeClock
    store: OutageStore
    revoker: Revoker
    metrics: Metrics

    def gatekeeper(self, *, enforce: bool = True, allow_unknown: bool = False) -> Gatekeeper:
        return Gatekeeper(
            self.store,
            hasher=HASHER,
            revoker=self.revoker,
            metrics=self.metrics,
            allow_unknown=allow_unknown,
            default_limit=5,
            user_limit=None,
            window_seconds=WINDOW,
            enforce=enforce,
        )

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


#: The labels of an admission without a configured workflow, app or a request class.
UNCLASSED = {"workflow": "other", "class": "none", "app": "other"}


@pytest.fixture
async def kit() -> AsyncIterator[Kit]:
    clock = FakeClock()
    store = OutageStore(clock=clock, window_seconds=WINDOW)
    record = SessionRecord(HASHER(SECRET), "cksess_gate", "user", int(clock()) + 600, LIMIT)
    await store.register(record)
    metrics = Metrics()
    revoker = Revoker(store, replica="replica-a", metrics=metrics)
    yield Kit(clock, store, revoker, metrics)
    await revoker.stop(flush_timeout=0)
    await store.close()


def bearer(secret: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"gateway"), (b"authorization", b"Bearer " + secret)]


async def test_an_admitted_secret_yields_its_hash_and_rate_limit_headers(kit: Kit) -> None:
    admission = await kit.gatekeeper().check(bearer(SECRET))

    assert admission.secret_hash == HASHER(SECRET)
    assert dict(admission.headers)[b"x-ratelimit-remaining-requests"] == b"1"
    assert (
        kit.count("chatkit_gateway_admission_decisions_total", outcome="admitted", **UNCLASSED) == 1
    )


async def test_the_window_refuses_at_the_limit_and_admits_again_once_it_slides(
    kit: Kit,
) -> None:
    gatekeeper = kit.gatekeeper()
    for _ in range(LIMIT):
        await gatekeeper.check(bearer(SECRET))

    with pytest.raises(RateLimited) as refused:
        await gatekeeper.check(bearer(SECRET))
    assert dict(refused.value.headers)[b"retry-after"] == str(WINDOW).encode()

    kit.clock.advance(WINDOW)
    assert (await gatekeeper.check(bearer(SECRET))).secret_hash == HASHER(SECRET)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("revoked", "client_secret_revoked"),
        ("expired", "client_secret_expired"),
        ("unknown", "invalid_client_secret"),  # never seen in a session-create answer
    ],
)
async def test_a_secret_the_store_rejects_is_refused_with_its_code(
    kit: Kit, case: str, code: str
) -> None:
    secret = SECRET
    if case == "revoked":
        await kit.revoker.revoke(secret_hash=HASHER(SECRET), session_id=None, reason="admin")
    elif case == "expired":
        kit.clock.advance(601)
    else:
        secret = b"ek_never_learned"

    with pytest.raises(AuthError) as refused:
        await kit.gatekeeper().check(bearer(secret))

    assert (refused.value.status, refused.value.code) == (401, code)
    assert kit.count("chatkit_gateway_admission_decisions_total", outcome=case, **UNCLASSED) == 1


async def test_unknown_secrets_are_admitted_at_the_default_limit_when_allowed(kit: Kit) -> None:
    admission = await kit.gatekeeper(allow_unknown=True).check(bearer(b"ek_never_learned"))

    assert dict(admission.headers)[b"x-ratelimit-limit-requests"] == b"5"


async def test_a_malformed_authorization_is_refused_before_the_store_is_asked(kit: Kit) -> None:
    with pytest.raises(AuthError) as refused:
        await kit.gatekeeper().check([(b"authorization", b"Basic dXNlcjpwYXNz")])

    assert refused.value.code == "invalid_authorization"
    assert kit.store.calls == 0


async def test_a_store_outage_fails_closed_with_503_and_is_counted(kit: Kit) -> None:
    kit.store.down = True

    with pytest.raises(StoreUnavailable) as refused:
        await kit.gatekeeper().check(bearer(SECRET))

    assert refused.value.status == 503
    assert kit.count("chatkit_gateway_store_errors_total") == 1


async def test_a_revocation_still_pending_is_enforced_without_the_store(kit: Kit) -> None:
    kit.store.down = True
    await kit.revoker.revoke(secret_hash=HASHER(SECRET), session_id=None, reason="cancel")
    asked = kit.store.calls

    with pytest.raises(AuthError) as refused:
        await kit.gatekeeper().check(bearer(SECRET))

    # Refused as revoked, not 503: the store was never asked.
    assert refused.value.code == "client_secret_revoked"
    assert kit.store.calls == asked


@pytest.mark.parametrize(
    ("case", "label", "headers"),
    [
        ("malformed", "malformed", False),
        ("store down", "store_unavailable", False),
        ("rate limited", "rate_limited", True),  # the real window state is still reported
        ("unknown", "unknown", False),
    ],
)
async def test_report_only_admits_what_it_would_reject_and_counts_it(
    kit: Kit, case: str, label: str, headers: bool
) -> None:
    gatekeeper = kit.gatekeeper(enforce=False)
    request = bearer(SECRET)
    if case == "malformed":
        request = [(b"authorization", b"Bearer")]
    elif case == "store down":
        kit.store.down = True
    elif case == "rate limited":
        for _ in range(LIMIT):
            await gatekeeper.check(request)
    else:
        request = bearer(b"ek_never_learned")

    admission = await gatekeeper.check(request)  # admitted: nothing is raised

    assert bool(admission.headers) is headers
    assert kit.count("chatkit_gateway_report_only_would_reject_total", outcome=label) == 1
