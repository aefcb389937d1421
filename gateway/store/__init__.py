"""Shared state: the session registry, revocations and sliding windows.

Two backends behind one small interface (:class:`~gateway.store.base.Store`):
Redis for every real deployment, and an embedded in-process store so the
gateway runs with nothing else installed. One contract test suite runs
unchanged against both.
"""

from __future__ import annotations

from gateway.store.base import (
    AdmitRequest,
    AuditEntry,
    IssuedSession,
    SessionInfo,
    SessionRecord,
    Store,
)

__all__ = ["AdmitRequest", "AuditEntry", "IssuedSession", "SessionInfo", "SessionRecord", "Store"]
