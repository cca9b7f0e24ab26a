"""Multi-call refinement (SPEC section 8): answer, then ask the model N-1 times to review and improve it.

Every call goes through the gateway, so each one is retried, failed over, written as usage rows and
costed like any other; the client sees the last answer with the usage of all calls summed.
"""
from __future__ import annotations

import re
from typing import Iterator

from adapters import chunks_from_completion, make_usage
from errors import ValidationError
from gateway import CallResult, Gateway, StreamState

HEADER = "x-llm-num-calls"
REVIEW_PROMPT = ("Review your previous response critically: check it for mistakes, omissions and unclear "
                 "wording, then write an improved version. Reply with the improved response only.")
INTEGER = re.compile(r"^[0-9]{1,6}$")


def num_calls(headers, config) -> int:
    """The x-llm-num-calls header as an int in 1..MAX_NUM_CALLS (1 when absent); 400 otherwise."""
    raw = headers.get(HEADER)
    if raw is None:
        return 1
    if INTEGER.match(raw.strip()) and 1 <= int(raw) <= config.max_num_calls:
        return int(raw)
    raise ValidationError([{"path": HEADER, "message": f"must be an integer from 1 to {config.max_num_calls}"}])


def add_usage(a: dict | None, b: dict | None) -> dict:
    """The sum of two usage objects (detail fields are dropped: they would no longer add up)."""
    a, b = a or {}, b or {}
    return make_usage((a.get("prompt_tokens") or 0) + (b.get("prompt_tokens") or 0),
                      (a.get("completion_tokens") or 0) + (b.get("completion_tokens") or 0))


def review_body(body: dict, completion: dict) -> dict:
    """The next call's body: the conversation so far, the previous answer, and the request to improve it."""
    answer = completion["choices"][0]["message"].get("content") or ""
    return {**body, "messages": [*body["messages"], {"role": "assistant", "content": answer},
                                 {"role": "user", "content": REVIEW_PROMPT}]}


def _reviewable(completion: dict) -> bool:
    # A tool call cannot be reviewed before the client has run the tool: it is returned as it is.
    return not completion["choices"][0]["message"].get("tool_calls")


def complete(gw: Gateway, targets, body: dict, n: int, request_id: str, caller) -> CallResult:
    """N non-streaming calls, each after the first improving the previous answer; usage and cost summed."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    result = gw.complete(targets, body, request_id, caller)
    usage, cost, attempts, waited = (result.completion["usage"], result.cost_nusd, result.attempts,
                                     result.upstream_seconds)
    for _ in range(n - 1):
        if not _reviewable(result.completion):
            break
        body = review_body(body, result.completion)
        result = gw.complete(targets, body, request_id, caller)
        usage = add_usage(usage, result.completion["usage"])
        cost, attempts = cost + result.cost_nusd, attempts + result.attempts
        waited += result.upstream_seconds
    result.completion["usage"] = usage
    return CallResult(result.completion, result.route, attempts, waited, cost)


def open_stream(gw: Gateway, targets, body: dict, n: int, request_id: str,
                caller) -> tuple[StreamState, Iterator[dict]]:
    """Like Gateway.open_stream, but the first N-1 calls run to completion and only the last one streams."""
    if n <= 1:
        return gw.open_stream(targets, body, request_id, caller)
    prior = complete(gw, targets, body, n - 1, request_id, caller)
    if not _reviewable(prior.completion):
        return replay(prior)
    state, chunks = gw.open_stream(targets, review_body(body, prior.completion), request_id, caller)
    state.attempts += prior.attempts
    state.upstream_seconds += prior.upstream_seconds
    return state, _with_prior(chunks, state, prior)


def _with_prior(chunks: Iterator[dict], state: StreamState, prior: CallResult) -> Iterator[dict]:
    """Relay the last call's chunks with the earlier calls' usage and cost added in."""
    try:
        for chunk in chunks:
            if chunk.get("usage"):  # a new dict: the gateway costs the last call from the original
                chunk = {**chunk, "usage": add_usage(prior.completion["usage"], chunk["usage"])}
            yield chunk
    finally:
        chunks.close()  # the gateway's relay has now costed the last call and set state.usage
        state.usage = add_usage(prior.completion["usage"], state.usage)
        state.cost_nusd += prior.cost_nusd


def replay(result: CallResult) -> tuple[StreamState, Iterator[dict]]:
    """A finished answer as a stream (cache hits, a refinement that ended on a tool call)."""
    usage = result.completion.get("usage")
    state = StreamState(result.route, result.attempts, result.upstream_seconds, usage=usage,
                        cost_nusd=result.cost_nusd, finished=True)
    return state, chunks_from_completion(result.completion)
