"""An in-memory ChatKit ``Store`` whose every record belongs to one user.

The ChatKit SDK authenticates nobody: whatever the ``context`` says is who the
request is from, and the store is where that becomes a boundary. Every method
here looks records up under ``context.user`` only, so a thread id guessed or
leaked from another user answers ``NotFoundError``, exactly like an id that
never existed (telling them apart would confirm that the id is real).

Memory only, for the example: a real deployment keeps threads in a database,
with the user in every key or ``WHERE`` clause the same way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TypeVar

from chatkit.store import NotFoundError, Store
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata

_T = TypeVar("_T")


@dataclass(frozen=True)
class RequestContext:
    """Who a request is from, as the gateway vouched for it (never the client)."""

    user: str
    session_id: str
    workflow_id: str
    workflow_version: str | None = None
    expires_at: int | None = None
    #: The turn's X-ChatKit-Model-Token: this server's key to the model,
    #: through the gateway (issued for turns only, when the gateway has a model key).
    model_token: str | None = None


@dataclass
class _Thread:
    metadata: ThreadMetadata
    items: list[ThreadItem]


def _page(records: list[_T], key: list[str], *, after: str | None, limit: int) -> Page[_T]:
    """The ``limit`` records following the one whose id is ``after`` (ids in ``key``)."""
    start = key.index(after) + 1 if after is not None and after in key else 0
    chunk = records[start : start + limit]
    has_more = start + limit < len(records)
    last = key[start + len(chunk) - 1] if chunk else None
    return Page(data=chunk, has_more=has_more, after=last if has_more else None)


class MemoryStore(Store[RequestContext]):
    """Threads, items and attachments in dictionaries keyed by user first."""

    def __init__(self) -> None:
        self._threads: defaultdict[str, dict[str, _Thread]] = defaultdict(dict)
        self._attachments: defaultdict[str, dict[str, Attachment]] = defaultdict(dict)

    def _thread(self, thread_id: str, context: RequestContext) -> _Thread:
        thread = self._threads[context.user].get(thread_id)
        if thread is None:
            raise NotFoundError(f"Thread {thread_id} not found")
        return thread

    async def load_thread(self, thread_id: str, context: RequestContext) -> ThreadMetadata:
        return self._thread(thread_id, context).metadata.model_copy(deep=True)

    async def save_thread(self, thread: ThreadMetadata, context: RequestContext) -> None:
        # ``Thread`` (with items) is a subclass; keep only the metadata fields.
        metadata = ThreadMetadata.model_validate(thread.model_dump(exclude={"items"}))
        existing = self._threads[context.user].get(thread.id)
        if existing is None:
            self._threads[context.user][thread.id] = _Thread(metadata=metadata, items=[])
        else:
            existing.metadata = metadata

    async def load_thread_items(
        self,
        thread_id: str,
        after: str | None,
        limit: int,
        order: str,
        context: RequestContext,
    ) -> Page[ThreadItem]:
        items = list(self._thread(thread_id, context).items)
        if order == "desc":
            items.reverse()
        return _page(items, [item.id for item in items], after=after, limit=limit)

    async def load_threads(
        self,
        limit: int,
        after: str | None,
        order: str,
        context: RequestContext,
    ) -> Page[ThreadMetadata]:
        threads = sorted(
            (thread.metadata for thread in self._threads[context.user].values()),
            key=lambda metadata: metadata.created_at,
            reverse=order == "desc",
        )
        return _page(threads, [thread.id for thread in threads], after=after, limit=limit)

    async def add_thread_item(
        self, thread_id: str, item: ThreadItem, context: RequestContext
    ) -> None:
        self._thread(thread_id, context).items.append(item.model_copy(deep=True))

    async def save_item(self, thread_id: str, item: ThreadItem, context: RequestContext) -> None:
        items = self._thread(thread_id, context).items
        for index, existing in enumerate(items):
            if existing.id == item.id:
                items[index] = item.model_copy(deep=True)
                return
        items.append(item.model_copy(deep=True))

    async def load_item(self, thread_id: str, item_id: str, context: RequestContext) -> ThreadItem:
        for item in self._thread(thread_id, context).items:
            if item.id == item_id:
                return item.model_copy(deep=True)
        raise NotFoundError(f"Item {item_id} not found in thread {thread_id}")

    async def delete_thread(self, thread_id: str, context: RequestContext) -> None:
        self._threads[context.user].pop(thread_id, None)

    async def delete_thread_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> None:
        thread = self._thread(thread_id, context)
        thread.items = [item for item in thread.items if item.id != item_id]

    async def save_attachment(self, attachment: Attachment, context: RequestContext) -> None:
        self._attachments[context.user][attachment.id] = attachment.model_copy(deep=True)

    async def load_attachment(self, attachment_id: str, context: RequestContext) -> Attachment:
        attachment = self._attachments[context.user].get(attachment_id)
        if attachment is None:
            raise NotFoundError(f"Attachment {attachment_id} not found")
        return attachment.model_copy(deep=True)

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        self._attachments[context.user].pop(attachment_id, None)
