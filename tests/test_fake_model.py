"""The fake model API speaks as OpenAI documents it: its events validate
against the official SDK's own types, and the SDK reads its answers."""

from __future__ import annotations

import json
import typing
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel

from tests.fake_model import FakeModel


def _event_classes() -> dict[str, type[BaseModel]]:
    """Each Responses stream event type's model, from the SDK's own union
    (``Annotated[Union[...], discriminator]``)."""
    union = typing.get_args(ResponseStreamEvent)[0]
    classes: dict[str, type[BaseModel]] = {}
    for cls in typing.get_args(union):
        for literal in typing.get_args(cls.model_fields["type"].annotation):
            classes[literal] = cls
    return classes


EVENT_CLASSES = _event_classes()


def validated(event: dict[str, Any]) -> Any:
    """The event as the SDK's model for its type, validated strictly."""
    return EVENT_CLASSES[event["type"]].model_validate(event, strict=False)


@pytest.fixture
async def model() -> AsyncIterator[FakeModel]:
    async with FakeModel() as fake:
        yield fake


def data_lines(raw: bytes) -> list[str]:
    return [
        line.removeprefix("data: ")
        for line in raw.decode().split("\n")
        if line.startswith("data: ")
    ]


@pytest.mark.parametrize("ending", ["completed", "incomplete", "failed"])
async def test_every_responses_event_validates_and_usage_comes_last(
    model: FakeModel, ending: str
) -> None:
    model.ending = ending  # type: ignore[assignment]
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{model.url}/v1/responses",
            json={"model": "gpt-5-mini", "input": "hi", "stream": True},
            headers={"Authorization": f"Bearer {model.api_key}"},
        ) as response,
    ):
        raw = await response.read()
    events = [validated(json.loads(line)) for line in data_lines(raw)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == f"response.{ending}"
    with_usage = [
        e for e in events if getattr(getattr(e, "response", None), "usage", None) is not None
    ]
    assert with_usage == [events[-1]]


async def test_the_official_sdk_reads_the_responses_stream(model: FakeModel) -> None:
    client = openai.AsyncOpenAI(api_key=model.api_key, base_url=f"{model.url}/v1")
    async with client:
        stream = await client.responses.create(model="gpt-5-mini", input="hello", stream=True)
        text = ""
        final: Response | None = None
        async for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                final = event.response
    assert text == model.answer
    assert final is not None
    assert final.usage is not None
    assert final.usage.output_tokens == len(model.answer.split())


async def test_chat_chunks_validate_and_usage_only_when_asked(model: FakeModel) -> None:
    client = openai.AsyncOpenAI(api_key=model.api_key, base_url=f"{model.url}/v1")
    async with client:
        for include in (True, False):
            stream = await client.chat.completions.create(
                model="gpt-5-mini",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": include},
            )
            chunks = [chunk async for chunk in stream]
            for chunk in chunks:
                ChatCompletionChunk.model_validate(chunk.model_dump())
            usage = [c for c in chunks if c.usage is not None]
            if include:
                assert usage == [chunks[-1]]
                assert chunks[-1].choices == []
            else:
                assert usage == []
        completion = await client.chat.completions.create(
            model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert isinstance(completion, ChatCompletion)
        assert completion.usage is not None


async def test_a_wrong_key_is_refused_as_openai_refuses_it(model: FakeModel) -> None:
    client = openai.AsyncOpenAI(api_key="sk-wrong", base_url=f"{model.url}/v1", max_retries=0)
    async with client:
        with pytest.raises(openai.AuthenticationError):
            await client.responses.create(model="gpt-5-mini", input="hi")
