"""A fake of OpenAI's Responses and Chat Completions APIs, served over real HTTP.

The model side of a self-hosted ChatKit server: what the gateway's model
routes forward to. Its answers follow OpenAI's documented shapes (checked
against the official SDK's own types in tests/test_fake_model.py):

- ``POST /v1/responses``, ``stream: true``: ``response.created``,
  ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, one ``response.output_text.delta`` per
  word, the matching ``.done`` events, and last ``response.completed`` (or
  ``response.incomplete`` / ``response.failed``) whose ``response.usage``
  is the only usage in the stream. Without ``stream``: the Response object.
- ``POST /v1/chat/completions``, ``stream: true``: ``chat.completion.chunk``
  objects, a ``finish_reason`` chunk, then (only with
  ``stream_options.include_usage``) one chunk with empty ``choices`` and the
  usage, then ``data: [DONE]``. Without ``stream``: the ChatCompletion object.

Usage is a function of the request, so a test can predict it: input tokens
are the request body's bytes // 10, cached input a tenth of that when the
test sets ``cached_ratio``, output one token per word answered. Every request
is recorded with its ``Authorization`` header, so a test can show the real
key reached the fake and nothing else did.

    async with FakeModel(api_key="sk-real") as model:
        model.answer = "hello there"    # what the model "says"
        model.ending = "cut"            # end streams without their usage
        model.hold = asyncio.Event()    # hold streams before their last event
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal, Self

from aiohttp import web

Ending = Literal["completed", "incomplete", "failed", "cut"]


@dataclass
class ModelCall:
    """One request that reached the fake."""

    path: str
    authorization: str | None
    headers: dict[str, str]
    body: dict[str, Any]
    raw_bytes: int = 0  # the request body's length as received
    usage: dict[str, int] | None = None  # what the fake reported, if it did
    finished: bool = False  # the answer went out whole


class FakeModel:
    def __init__(self, *, api_key: str = "sk-fake-model-key-0123456789", port: int = 0) -> None:
        self.api_key = api_key
        self.answer = "The quick brown fox jumps over the lazy dog"
        self.ending: Ending = "completed"
        self.cached_ratio = 0.0
        #: Set: streams wait on it before their last event (the one with usage).
        self.hold: asyncio.Event | None = None
        self.calls: list[ModelCall] = []
        self.streams_open = 0
        self._runner: web.AppRunner | None = None
        self._port = port
        self._counter = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        # handler_cancellation: a caller that goes away ends the handler, as
        # a cut connection ends OpenAI's stream.
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        self._port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what a test predicts --------------------------------------------------------

    def usage_for(self, body: bytes) -> tuple[int, int, int]:
        """(input, cached input, output) tokens this fake reports for ``body``."""
        input_tokens = max(len(body) // 10, 1)
        cached = int(input_tokens * self.cached_ratio)
        output = len(self.answer.split())
        return input_tokens, cached, output

    # -- endpoints ----------------------------------------------------------------------

    async def _unknown(self, request: web.Request) -> web.Response:
        self.calls.append(
            ModelCall(request.path, request.headers.get("Authorization"), dict(request.headers), {})
        )
        return _error(
            404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error"
        )

    async def _accept(
        self, request: web.Request
    ) -> tuple[ModelCall, tuple[int, int, int]] | web.Response:
        """The call recorded and the usage it will report, or the API's refusal."""
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        call = ModelCall(
            request.path,
            request.headers.get("Authorization"),
            dict(request.headers),
            body if isinstance(body, dict) else {},
            len(raw),
        )
        self.calls.append(call)
        if call.authorization != f"Bearer {self.api_key}":
            return _error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "you must provide a model parameter", "invalid_request_error")
        return call, self.usage_for(raw)

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter:024x}"

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        accepted = await self._accept(request)
        if isinstance(accepted, web.Response):
            return accepted
        call, (input_tokens, cached, output) = accepted
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output,
        }
        words = self.answer.split()
        response_id, item_id = self._next_id("resp"), self._next_id("msg")
        status = "completed" if self.ending in ("completed", "cut") else self.ending

        def response(state: str, *, with_output: bool, with_usage: bool) -> dict[str, Any]:
            text = " ".join(words)
            return {
                "id": response_id,
                "object": "response",
                "created_at": int(time.time()),
                "status": state,
                "model": call.body["model"],
                "output": [_message(item_id, text)] if with_output else [],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "error": (
                    {"code": "server_error", "message": "The model failed."}
                    if state == "failed"
                    else None
                ),
                "incomplete_details": (
                    {"reason": "max_output_tokens"} if state == "incomplete" else None
                ),
                "max_output_tokens": call.body.get("max_output_tokens"),
                "usage": usage if with_usage else None,
            }

        if not call.body.get("stream"):
            call.usage = {"input": input_tokens, "cached": cached, "output": output}
            call.finished = True
            return web.json_response(response(status, with_output=True, with_usage=True))
        text = " ".join(words)
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        started = response("in_progress", with_output=False, with_usage=False)
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**_message(item_id, ""), "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **at, "part": _text_part("")},
        ]
        for index, word in enumerate(words):
            delta = word if index == 0 else " " + word
            events.append(
                {"type": "response.output_text.delta", **at, "delta": delta, "logprobs": []}
            )
        events += [
            {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **at, "part": _text_part(text)},
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": _message(item_id, text),
            },
        ]
        final = {
            "type": f"response.{status}",
            "response": response(status, with_output=True, with_usage=True),
        }
        framed = [
            f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
            for n, e in enumerate([*events, final])
        ]
        return await self._stream(request, call, framed, usage_of=(input_tokens, cached, output))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        accepted = await self._accept(request)
        if isinstance(accepted, web.Response):
            return accepted
        call, (input_tokens, cached, output) = accepted
        usage = {
            "prompt_tokens": input_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens": output,
            "completion_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output,
        }
        completion_id = self._next_id("chatcmpl")
        created = int(time.time())
        model = call.body["model"]
        text = self.answer
        if not call.body.get("stream"):
            call.usage = {"input": input_tokens, "cached": cached, "output": output}
            call.finished = True
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        options = call.body.get("stream_options") or {}
        with_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            if with_usage and "usage" not in extra:
                body["usage"] = None  # as the API sends it on every other chunk
            return f"data: {json.dumps(body)}\n\n".encode()

        def choice(delta: dict[str, str], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        words = text.split()
        framed = [chunk(choice({"role": "assistant", "content": ""}))]
        for index, word in enumerate(words):
            framed.append(chunk(choice({"content": word if index == 0 else " " + word})))
        framed.append(chunk(choice({}, "stop")))
        if with_usage:
            framed.append(chunk([], usage=usage))
        framed.append(b"data: [DONE]\n\n")
        reported = (input_tokens, cached, output) if with_usage else None
        return await self._stream(request, call, framed, usage_of=reported, last_n=2)

    async def _stream(
        self,
        request: web.Request,
        call: ModelCall,
        framed: list[bytes],
        *,
        usage_of: tuple[int, int, int] | None,
        last_n: int = 1,
    ) -> web.StreamResponse:
        """Send ``framed`` events; the last ``last_n`` wait for ``hold`` and
        are left out when the ending is "cut" (the connection then drops)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.streams_open += 1
        try:
            for event in framed[:-last_n]:
                await response.write(event)
            if self.hold is not None:
                await self.hold.wait()
            if self.ending == "cut":
                transport = request.transport
                if transport is not None:
                    transport.abort()
                return response
            for event in framed[-last_n:]:
                await response.write(event)
            await response.write_eof()
            if usage_of is not None:
                call.usage = dict(zip(("input", "cached", "output"), usage_of, strict=True))
            call.finished = True
            return response
        finally:
            self.streams_open -= 1


def _message(item_id: str, text: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _error(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": code}},
        status=status,
    )


async def _serve(port: int, api_key: str) -> None:
    model = FakeModel(api_key=api_key, port=port)
    async with model:
        print(f"fake model on {model.url}", flush=True)
        await asyncio.Event().wait()  # until the process is stopped


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.fake_model --port 9002 --api-key sk-...`` (for scripts/bench)."""
    import argparse
    import contextlib

    parser = argparse.ArgumentParser(description="A fake OpenAI model API over HTTP.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.api_key))


if __name__ == "__main__":
    main()
