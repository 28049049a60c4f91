"""Batch document jobs: JSONL in, JSONL out, resumable after any crash.

Each input line is a record with an ``id`` and either ``messages`` or a text field that is filled into a
prompt template. Each result is appended to the output (and fsynced) as soon as it is done: the id, the
answer, usage and timings, or the error. Running the same job again skips the ids already in the output, so
``kill -9`` at any moment loses nothing written and duplicates nothing; a torn last line (the process died
mid-write) is cut off and its record done again.

Example:
    $ unillm batch docs.jsonl -o summaries.jsonl --model smollm2 --template summarise.txt
"""

from __future__ import annotations

import json
import os
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .batch import BatchResult
from .errors import ConfigError, InvalidRequestError, UnillmError
from .types import EmbeddingResponse

if TYPE_CHECKING:
    from .cluster import RayConfig

DEFAULT_TEMPLATE = "$text"


@dataclass
class JobSummary:
    """What a run of a job did."""

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    invalid: int = 0
    repaired_torn_line: bool = False
    completion_tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        torn = ", repaired a torn last line" if self.repaired_torn_line else ""
        return (
            f"{self.total} records: {self.done} done, {self.failed} failed, {self.skipped} skipped (already in the "
            f"output){torn}; {self.completion_tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_s:.1f} tok/s)"
        )


def read_done(output: Path) -> tuple[dict[str, bool], bool]:
    """Ids already in the output (id -> succeeded), repairing a torn last line. Returns (ids, repaired)."""
    if not output.exists():
        return {}, False
    data = output.read_bytes()
    repaired = False
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(output, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
        data, repaired = data[:cut], True
    done: dict[str, bool] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[str(rec["id"])] = "error" not in rec
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"line {n} is not a result record ({exc}); is this the right output file?", path=str(output)) from exc
    return done, repaired


def load_template(path: str | os.PathLike[str] | None) -> string.Template:
    if path is None:
        return string.Template(DEFAULT_TEMPLATE)
    return string.Template(Path(path).read_text(encoding="utf-8"))


def to_messages(record: dict[str, Any], template: string.Template, text_field: str) -> list[dict[str, str]] | str:
    """The chat input of one record: its ``messages``, or its text field filled into the template."""
    if "messages" in record:
        return record["messages"]  # type: ignore[no-any-return]
    if text_field not in record:
        raise InvalidRequestError(f"record has neither 'messages' nor the text field {text_field!r}")
    try:
        return template.substitute({**{k: str(v) for k, v in record.items()}, "text": str(record[text_field])})
    except (KeyError, ValueError) as exc:
        raise InvalidRequestError(f"the template needs field {exc} that the record lacks") from exc


def _embed_each(engine: Any, model: str, items: list[Any], write: Any, progress: bool) -> list[BatchResult]:
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
    if isinstance(res.response, EmbeddingResponse):
        e = res.response
        return {"id": rid, "model": e.model, "embedding": e.data[0].embedding, "usage": {"prompt_tokens": e.usage.prompt_tokens}}
    if res.response is not None:
        r = res.response
        out: dict[str, Any] = {
            "id": rid, "model": r.model, "answer": r.text, "finish_reason": r.finish_reason,
            "usage": r.usage.to_dict(), "timings": r.timings.to_dict(),
        }
        msg = r.choices[0].message
        if len(r.choices) > 1:  # n > 1: every answer
            out["answers"] = [c.message.content for c in r.choices]
        if msg.parsed is not None:
            out["parsed"] = msg.parsed.model_dump(mode="json") if hasattr(msg.parsed, "model_dump") else msg.parsed
        if msg.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in msg.tool_calls]
        if r.requested_model:
            out["requested_model"], out["fallback_reason"] = r.requested_model, r.fallback_reason
        return out
    assert res.error is not None
    return {"id": rid, "model": model, "error": {"type": type(res.error).__name__, "message": str(res.error)}}


def read_records(lines: Iterable[str]) -> list[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record, problem) for each non-empty input line."""
    out: list[tuple[int, dict[str, Any] | None, str | None]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            out.append((n, None, f"line {n} is not JSON: {exc}"))
            continue
        if not isinstance(rec, dict) or "id" not in rec:
            out.append((n, None, f"line {n} has no 'id'"))
            continue
        out.append((n, rec, None))
    return out


def run_job(
    engine: Any,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    model: str,
    *,
    template: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    retry_failed: bool = False,
    progress: bool = True,
    embed: bool = False,
    ray: RayConfig | str | bool | None = None,
    **params: Any,
) -> JobSummary:
    """Run (or resume) a job with ``engine`` (an :class:`~unillm.Engine`). With ``embed``, each record's text
    (the template filled in) gets its vector instead of an answer.

    ``ray`` runs the records on Ray replicas instead of ``engine`` (which then only supplies the registry):
    ``True`` on a Ray instance started on this machine for the job, an address (``"auto"``,
    ``"ray://host:10001"``) to join a cluster, or a :class:`unillm.cluster.RayConfig` (replicas, resources).
    The output file and its resume rules are the same either way."""
    if embed and params:
        raise InvalidRequestError(f"an embedding job takes no chat parameters (got {sorted(params)})")
    ray_config = _ray_config(ray)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    done, repaired = read_done(output)
    tmpl = load_template(template)
    summary = JobSummary(repaired_torn_line=repaired)
    todo: list[tuple[str, list[dict[str, str]] | str]] = []
    unusable: list[tuple[str, str]] = []
    seen: set[str] = set()
    with open(input_path, encoding="utf-8") as f:
        records = read_records(f)
    summary.total = len(records)
    for _, rec, problem in records:
        if rec is None:
            summary.invalid += 1
            summary.errors.append(str(problem))
            continue
        rid = str(rec["id"])
        if rid in seen:
            summary.invalid += 1
            summary.errors.append(f"id {rid!r} appears twice in the input; the second is ignored")
            continue
        seen.add(rid)
        if rid in done and (done[rid] or not retry_failed):
            summary.skipped += 1
            continue
        try:
            todo.append((rid, to_messages(rec, tmpl, text_field)))
        except InvalidRequestError as exc:
            unusable.append((rid, str(exc)))

    with open(output, "a", encoding="utf-8") as out:
        written: set[str] = set()

        def emit(record: dict[str, Any]) -> None:
            """Append and fsync one result, once per id and run, and count it."""
            rid = str(record["id"])
            if rid in written:  # Ray ran a task again after its replica died: the first answer stands
                return
            written.add(rid)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            if "error" in record:
                summary.failed += 1
                summary.errors.append(f"{rid}: {record['error']['message']}")
            else:
                summary.done += 1
                summary.completion_tokens += record["usage"].get("completion_tokens", 0)

        for rid, problem in unusable:
            emit({"id": rid, "model": model, "error": {"type": "InvalidRequestError", "message": problem}})

        def write(res: BatchResult) -> None:
            emit(result_record(todo[res.index][0], model, res))

        t0 = time.perf_counter()
        if ray_config is not None:
            _run_on_ray(engine, model, todo, params, embed, ray_config, emit, progress, summary)
        elif embed:
            _embed_each(engine, model, [m for _, m in todo], write, progress)
        elif todo:
            engine.batch(model, [m for _, m in todo], progress=progress, on_result=write, **params)
        summary.seconds = time.perf_counter() - t0
    return summary


def _ray_config(ray: RayConfig | str | bool | None) -> RayConfig | None:
    if ray is None or ray is False:
        return None
    from .cluster import RayConfig

    if ray is True:
        return RayConfig()
    if isinstance(ray, str):
        return RayConfig(address=ray)
    if isinstance(ray, RayConfig):
        return ray
    raise InvalidRequestError(f"ray must be True, an address or a RayConfig (got {type(ray).__name__})")


def _run_on_ray(
    engine: Any, model: str, todo: list[tuple[str, Any]], params: dict[str, Any], embed: bool, config: RayConfig,
    emit: Any, progress: bool, summary: JobSummary,
) -> None:
    from tqdm.auto import tqdm

    from .cluster import ray_results

    bar = tqdm(total=len(todo), desc=f"{model} on Ray", unit="doc", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        specs = engine.registry.fallback_chain(model)
        for record in ray_results(specs, model, todo, params, embed, config, engine.fallbacks):
            emit(record)
            bar.update(1)
            rate = summary.completion_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{rate:.1f} tok/s, {summary.failed} failed", refresh=False)
    finally:
        bar.close()
