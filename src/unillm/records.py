"""The records of a batch job, shared by the local runner (:mod:`unillm.jobs`) and Ray's replicas
(:mod:`unillm.cluster`): what is written for each result, and the embedding runner that makes them.

Example:
    >>> from unillm.errors import InvalidRequestError
    >>> from unillm.types import BatchResult
    >>> result_record("doc-1", "smollm2", BatchResult(0, error=InvalidRequestError("too long")))
    {'id': 'doc-1', 'model': 'smollm2', 'error': {'type': 'InvalidRequestError', 'message': 'too long'}}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .errors import InvalidRequestError, UnillmError
from .completions import Prompt
from .types import BatchResult, Completion, EmbeddingResponse


def embed_each(
    engine: Any, model: str, items: list[Any], write: Callable[[BatchResult], None], progress: bool,
) -> list[BatchResult]:
    """One vector per record (one call each, so each record's usage is its own and a failure is its own)."""
    from tqdm.auto import tqdm

    results = []
    for i, item in enumerate(tqdm(items, desc=model, unit="doc", disable=not progress, dynamic_ncols=True)):
        try:
            if not isinstance(item, str):
                raise InvalidRequestError("an embedding job reads the record's text field, not 'messages'")
            res = BatchResult(i, response=engine.embed(model, item))
        except UnillmError as exc:
            res = BatchResult(i, error=exc)
        write(res)
        results.append(res)
    return results


def result_record(rid: str, model: str, res: BatchResult) -> dict[str, Any]:
    """The output line of one record: its answer (or vector), usage and timings, or its error."""
    out: dict[str, Any]
    if isinstance(res.response, EmbeddingResponse):
        e = res.response
        return {"id": rid, "model": e.model, "embedding": e.data[0].embedding, "usage": {"prompt_tokens": e.usage.prompt_tokens}}
    if isinstance(res.response, Completion):
        c = res.response
        out = {"id": rid, "model": c.model, "answer": c.text, "finish_reason": c.finish_reason,
               "usage": c.usage.to_dict() if c.usage else None, "timings": c.timings.to_dict() if c.timings else None}
        if len(c.choices) > 1:
            out["answers"] = [choice.text for choice in c.choices]
        return out
    if res.response is not None:
        r = res.response
        out = {
            "id": rid, "model": r.model, "answer": r.text, "finish_reason": r.finish_reason,
            "usage": r.usage.to_dict(), "timings": r.timings.to_dict(),
        }
        msg = r.choices[0].message
        if len(r.choices) > 1:  # n > 1: every answer
            out["answers"] = [c.message.content for c in r.choices]
        if msg.reasoning_content:
            out["reasoning"] = msg.reasoning_content
        if msg.parsed is not None:
            out["parsed"] = msg.parsed.model_dump(mode="json") if hasattr(msg.parsed, "model_dump") else msg.parsed
        if msg.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in msg.tool_calls]
        if r.requested_model:
            out["requested_model"], out["fallback_reason"] = r.requested_model, r.fallback_reason
        return out
    assert res.error is not None
    return {"id": rid, "model": model, "error": {"type": type(res.error).__name__, "message": str(res.error)}}


def encode_input(item: Any) -> str:
    """A job's input (messages, a prompt string, or a completion Prompt) as JSON, for a Ray replica."""
    if isinstance(item, Prompt):
        return json.dumps({"unillm.prompt": {"text": item.text, "suffix": item.suffix, "files": list(item.files)}},
                          ensure_ascii=False)
    return json.dumps(item, ensure_ascii=False)


def decode_input(text: str) -> Any:
    """The input :func:`encode_input` wrote."""
    item = json.loads(text)
    if isinstance(item, dict) and "unillm.prompt" in item:
        p = item["unillm.prompt"]
        return Prompt(p["text"], p["suffix"], tuple((name, body) for name, body in p["files"]))
    return item

