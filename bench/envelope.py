"""The cost of reading a ChatKit envelope, measured in process.

Issued ``POST /chatkit`` requests have their body parsed and classed before
admission (gateway/chatkit.py); this isolates that step from the rest of a
request so its share of the issued rows' cost can be quoted.
"""

from __future__ import annotations

import timeit

from gateway.chatkit import needs, parse_envelope

#: A threads.create as ChatKit JS sends it, with a model named.
ENVELOPE = (
    b'{"type":"threads.create","params":{"input":{"content":[{"type":"input_text",'
    b'"text":"Hello from scripts/bench"}],"attachments":[],"quoted_text":"",'
    b'"inference_options":{"model":"gpt-5-mini","tool_choice":null}}},"metadata":{}}'
)


def envelope_cost_us(number: int = 20_000, repeat: int = 5) -> float:
    """The best of ``repeat`` timings, in µs per envelope: parse, class, needs."""

    def once() -> None:
        needs(parse_envelope(ENVELOPE, max_bytes=1 << 20, max_transcribe_bytes=1 << 24))

    best = min(timeit.repeat(once, number=number, repeat=repeat))
    return best / number * 1_000_000
