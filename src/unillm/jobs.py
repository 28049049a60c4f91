"""Batch document jobs: JSONL in, JSONL out, resumable after any crash.

Each input line is a record with an ``id`` and either ``messages`` or a text field that is filled into a
prompt template. Each result is appended to the output (and fsynced) as soon as it is done: the id, the
answer, usage and timings, or the error. Running the same job again skips the ids already in the output, so
``kill -9`` at any moment loses nothing written and duplicates nothing; a torn last line (the process died
mid-write) is cut off and its record done again.

The output is locked while a job writes it (a second job on it is refused, with the first one's PID), must be
a regular file that is not the input, and is checked after every record: a file removed or replaced while the
job runs, or a write that fails (a full disk), stops the job with :class:`~unillm.errors.JobError` instead of
reporting records it could not keep. Ids are told apart by their JSON value: ``1`` and ``"1"`` are two records.

Example:
    $ unillm batch docs.jsonl -o summaries.jsonl --model smollm2 --template summarise.txt
"""

from __future__ import annotations

import contextlib
import json
import os
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .completions import Prompt
from .textgen import make_prompt
from .errors import ConfigError, InvalidRequestError, JobError
from .records import embed_each, result_record
from .types import BatchResult

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
        # An invalid line (not JSON, no id, an id twice) has no id to be written or resumed by: it is counted
        # and named here on every run until the input is fixed.
        invalid = f", {self.invalid} invalid (not run: see the errors)" if self.invalid else ""
        return (
            f"{self.total} records: {self.done} done, {self.failed} failed, {self.skipped} skipped (already in the "
            f"output){invalid}{torn}; {self.completion_tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_s:.1f} tok/s)"
        )


def id_key(rid: Any) -> str:
    """The key that tells record ids apart: their JSON text (``1`` and ``"1"``, ``null`` and ``"None"`` differ)."""
    return json.dumps(rid, sort_keys=True)


def read_done(output: Path) -> tuple[dict[str, bool], bool]:
    """Ids already in the output (id key -> succeeded), repairing a torn last line. Returns (ids, repaired).

    Nothing is changed in a file that is not a job's output: every complete line must be a result record, and
    an unterminated last line is cut only when it is the start of one (``{"id": ...``, as records are written).
    """
    if not output.exists():
        return {}, False
    data = output.read_bytes()
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    done: dict[str, bool] = {}

    def record(n: int, line: bytes) -> None:
        try:
            rec = json.loads(line)
            done[id_key(rec["id"])] = "error" not in rec
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"line {n} is not a result record ({exc}); is this the right output file?", path=str(output)) from exc

    for n, line in enumerate(lines, 1):
        if line.strip():
            record(n, line)
    if not last:
        return done, False
    try:
        record(len(lines) + 1, last)  # complete, only its newline missing
        with open(output, "ab") as f:
            f.write(b"\n")
            os.fsync(f.fileno())
        return done, True
    except ConfigError:
        if not last.startswith(b'{"id": '):
            raise
    with open(output, "r+b") as cut:
        cut.truncate(len(data) - len(last))
        os.fsync(cut.fileno())
    return done, True


def load_template(path: str | os.PathLike[str] | None) -> string.Template:
    if path is None:
        return string.Template(DEFAULT_TEMPLATE)
    return string.Template(Path(path).read_text(encoding="utf-8"))


def to_messages(record: dict[str, Any], template: string.Template, text_field: str) -> list[dict[str, str]] | str | Prompt:
    """The input of one record: its ``messages``; its ``prompt`` (and ``suffix``), a raw or fill-in-the-middle
    completion; or its text field filled into the template (a chat message)."""
    if "messages" in record:
        return record["messages"]  # type: ignore[no-any-return]
    if "prompt" in record:
        return make_prompt(record["prompt"], record.get("suffix"), record.get("files"), False, {})
    if text_field not in record:
        raise InvalidRequestError(f"record has neither 'messages' nor the text field {text_field!r}")
    try:
        return template.substitute({**{k: str(v) for k, v in record.items()}, "text": str(record[text_field])})
    except (KeyError, ValueError) as exc:
        raise InvalidRequestError(f"the template needs field {exc} that the record lacks") from exc


def read_records(lines: Iterable[bytes | str]) -> list[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record, problem) for each non-empty input line."""
    out: list[tuple[int, dict[str, Any] | None, str | None]] = []
    for n, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.append((n, None, f"line {n} is not UTF-8 text (byte {exc.start})"))
                continue
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


class _Output:
    """A job's output file: locked for the job, appended and fsynced a record at a time, and checked after each
    record to be still the file at its path (see the module docstring)."""

    def __init__(self, path: Path, input_path: Path) -> None:
        self.path = path
        #: Where the lock holder's PID is written, for the error a second job gets.
        self.pid_file = path.with_name(f".{path.name}.lock")
        if path.exists() and not path.is_file() and not path.is_dir():  # a folder: open() says so
            raise JobError(f"the output {path} is not a regular file: a job reads its output back to resume, "
                           "so write to a file (then cat it)")
        if path.exists() and input_path.exists() and os.path.samefile(path, input_path):
            raise JobError(f"the output {path} is the input file: give another -o")
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "ab")
        try:
            self._lock()
            if created:  # the new name is durable too, not only the bytes written under it
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            self.file.close()
            raise
        st = os.fstat(self.file.fileno())
        self.identity = (st.st_dev, st.st_ino)
        self.written = 0
        #: Once the output could not be kept, every later record is refused with the same error (records already
        #: queued behind the failed one must not be written after the gap).
        self.broken: JobError | None = None

    def _lock(self) -> None:
        import fcntl

        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = self.pid_file.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise JobError(f"another job (PID {holder}) is writing {self.path}; wait for it, or give another -o") from None
        with contextlib.suppress(OSError):
            self.pid_file.write_text(f"{os.getpid()}\n")

    def append(self, line: str) -> None:
        if self.broken is not None:
            raise self.broken
        start = os.fstat(self.file.fileno()).st_size  # tell() of an append-mode file can be stale
        try:
            self.file.write(line.encode("utf-8") + b"\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):  # no torn line left behind
                self.file.truncate(start)
                os.fsync(self.file.fileno())
            self.broken = JobError(f"writing {self.path} failed after {self.written} records of this run "
                                   f"({exc.strerror or exc}); what was written stays: fix it and run the job again to resume")
            raise self.broken from exc
        self.check()
        self.written += 1

    def check(self) -> None:
        """JobError when the path no longer names the file this job writes (removed, or replaced)."""
        st = os.fstat(self.file.fileno())
        try:
            now = os.stat(self.path)
            same = (now.st_dev, now.st_ino) == self.identity
        except OSError:
            same = False
        if st.st_nlink == 0 or not same:
            self.broken = JobError(f"{self.path} was removed or replaced while the job ran: the {self.written + 1} "
                                   "records this run wrote are not there; run the job again to redo them")
            raise self.broken

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        self.file.close()


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
    tmpl = load_template(template)
    with open(input_path, "rb") as f:
        records = read_records(f)
    out = _Output(output, Path(input_path))
    try:
        return _run(engine, out, records, tmpl, model, text_field, retry_failed, progress, embed, ray_config, params)
    finally:
        out.close()


def _run(
    engine: Any, out: _Output, records: list[tuple[int, dict[str, Any] | None, str | None]], tmpl: string.Template,
    model: str, text_field: str, retry_failed: bool, progress: bool, embed: bool, ray_config: RayConfig | None,
    params: dict[str, Any],
) -> JobSummary:
    done, repaired = read_done(out.path)  # under the lock
    summary = JobSummary(repaired_torn_line=repaired, total=len(records))
    todo: list[tuple[str, list[dict[str, str]] | str | Prompt]] = []
    unusable: list[tuple[str, str]] = []
    ids: dict[str, Any] = {}  # id key -> the record's own id
    for _, rec, problem in records:
        if rec is None:
            summary.invalid += 1
            summary.errors.append(str(problem))
            continue
        key = id_key(rec["id"])
        if key in ids:
            summary.invalid += 1
            summary.errors.append(f"id {key} appears twice in the input; the second is ignored")
            continue
        ids[key] = rec["id"]
        if key in done and (done[key] or not retry_failed):
            summary.skipped += 1
            continue
        try:
            todo.append((key, to_messages(rec, tmpl, text_field)))
        except InvalidRequestError as exc:
            unusable.append((key, str(exc)))

    written: set[str] = set()

    def emit(record: dict[str, Any]) -> None:
        """Append and fsync one result (its id is the key, replaced here by the record's own id), once per id
        and run, and count it."""
        key = record["id"]
        if key in written:  # Ray ran a task again after its replica died: the first answer stands
            return
        record = {**record, "id": ids[key]}
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (an id, an echoed text): JSON's escapes keep it valid
            line = json.dumps(record)
        out.append(line)
        written.add(key)
        if "error" in record:
            summary.failed += 1
            summary.errors.append(f"{key}: {record['error']['message']}")
        else:
            summary.done += 1
            summary.completion_tokens += record["usage"].get("completion_tokens", 0)

    for key, problem in unusable:
        emit({"id": key, "model": model, "error": {"type": "InvalidRequestError", "message": problem}})

    def write(res: BatchResult) -> None:
        emit(result_record(todo[res.index][0], model, res))

    t0 = time.perf_counter()
    if ray_config is not None:
        _run_on_ray(engine, model, todo, params, embed, ray_config, emit, progress, summary)
    elif embed:
        embed_each(engine, model, [m for _, m in todo], write, progress)
    elif todo:
        engine.batch(model, [m for _, m in todo], progress=progress, on_result=write, **params)
    summary.seconds = time.perf_counter() - t0
    out.check()  # the records counted are on disk
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
