"""A batch job never reports records it could not keep, never writes one twice, and never damages a file
that is not its output (issue 26): each case was seen losing or duplicating records, or exiting 0 for nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from unillm import ConfigError, JobError
from unillm.jobs import _Output, run_job


def write_input(path: Path, n: int, *, ids=None) -> Path:
    ids = ids if ids is not None else [f"d{i}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": rid, "text": f"Name a colour number {k}."}) + "\n" for k, rid in enumerate(ids)))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


FAST = {"max_tokens": 4, "temperature": 0.0, "progress": False}


def test_a_second_job_on_the_same_output_is_refused_with_the_first_ones_pid(engine, tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    holder = _Output(out, inp)  # as a running job holds it
    try:
        with pytest.raises(JobError, match=f"PID {os.getpid()}"):
            run_job(engine, inp, out, "smollm2", **FAST)
    finally:
        holder.close()
    assert run_job(engine, inp, out, "smollm2", **FAST).done == 3
    assert sorted(r["id"] for r in lines(out)) == ["d0", "d1", "d2"]


def test_two_job_processes_on_one_output_write_each_record_once(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "unillm", "batch", str(inp), "-o", str(out), "-m", "smollm2", "-n", "16", "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    refused = [err for (_, err), p in zip(results, procs) if p.returncode == 2]
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == len(set(ids)) == 6  # every record once
    if codes == [0, 2]:  # they overlapped: the second was refused by name
        assert "another job (PID" in refused[0]
    else:  # the first had finished before the second began: it skipped everything
        assert codes == [0, 0]


def test_the_input_as_output_is_refused_and_left_whole(engine, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}')  # no newline at the end
    before = inp.read_bytes()
    with pytest.raises(JobError, match="is the input"):
        run_job(engine, inp, inp, "smollm2", **FAST)
    assert inp.read_bytes() == before


def test_a_wrong_output_file_keeps_its_last_line(engine, tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 2), tmp_path / "notes.txt"
    out.write_text("my notes\nthe last line, without a newline")
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="right output file"):
        run_job(engine, inp, out, "smollm2", **FAST)
    assert out.read_bytes() == before


def test_a_torn_last_record_is_cut_and_a_complete_one_kept(engine, tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    run_job(engine, inp, out, "smollm2", **FAST)
    records = out.read_text().splitlines()
    out.write_text(records[0] + "\n" + records[1])  # the newline of the second record never made it
    summary = run_job(engine, inp, out, "smollm2", **FAST)
    assert (summary.skipped, summary.done, summary.repaired_torn_line) == (2, 1, True)
    out.write_text(out.read_text() + records[2][: len(records[2]) // 2])  # died inside a record
    summary = run_job(engine, inp, out, "smollm2", **FAST)
    assert summary.repaired_torn_line and summary.done == 0 and summary.skipped == 3
    assert sorted(r["id"] for r in lines(out)) == ["d0", "d1", "d2"]


def test_ids_are_told_apart_by_their_json_value(engine, tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 0, ids=[1, "1", None, "None", True]), tmp_path / "out.jsonl"
    summary = run_job(engine, inp, out, "smollm2", **FAST)
    assert (summary.done, summary.invalid) == (5, 0)
    assert [r["id"] for r in lines(out)] and sorted(map(json.dumps, (r["id"] for r in lines(out)))) == \
        sorted(['1', '"1"', 'null', '"None"', 'true'])
    assert run_job(engine, inp, out, "smollm2", **FAST).skipped == 5  # and resumed as such


def test_an_output_removed_mid_job_stops_it_with_an_error(engine, tmp_path):
    inp, folder = write_input(tmp_path / "in.jsonl", 40), tmp_path / "results"
    out = folder / "out.jsonl"

    def remove_when_written():
        deadline = time.time() + 120
        while time.time() < deadline:
            if out.exists() and out.stat().st_size > 0:
                shutil.rmtree(folder)  # rm -rf results/
                return
            time.sleep(0.01)

    t = threading.Thread(target=remove_when_written)
    t.start()
    with pytest.raises(JobError, match="removed or replaced"):
        run_job(engine, inp, out, "smollm2", max_tokens=32, temperature=0.0, progress=False)
    t.join()


def test_a_failed_write_leaves_no_torn_line_and_the_job_resumes(engine, tmp_path, monkeypatch):
    inp, out = write_input(tmp_path / "in.jsonl", 6), tmp_path / "out.jsonl"
    import unillm.jobs as jobs

    real, calls = os.fsync, [0]

    def full_disk(fd):
        calls[0] += 1
        if calls[0] == 4:  # the third record's fsync (the first is the folder's)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(jobs.os, "fsync", full_disk)
    with pytest.raises(JobError, match="No space left on device"):
        run_job(engine, inp, out, "smollm2", **FAST)
    monkeypatch.setattr(jobs.os, "fsync", real)
    assert out.read_bytes().endswith(b"\n") and len(lines(out)) == 2  # two kept, the third cut off whole
    summary = run_job(engine, inp, out, "smollm2", **FAST)
    assert (summary.skipped, summary.done) == (2, 4)
    assert sorted(r["id"] for r in lines(out)) == [f"d{i}" for i in range(6)]


def test_an_output_that_is_not_a_regular_file_is_refused(engine, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 1)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(JobError, match="not a regular file"):
        run_job(engine, inp, fifo, "smollm2", **FAST)  # -o /dev/stdout into a pipe hung here
    out = subprocess.run([sys.executable, "-m", "unillm", "batch", str(inp), "-o", "/dev/stdout", "-m", "smollm2",
                          "--no-progress"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a regular file" in out.stderr


def test_bad_bytes_and_lone_surrogates_in_the_input_are_records_not_tracebacks(engine, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b'{"id": "ok", "text": "Name a colour."}\n'
                    b'{"id": "latin1", "text": "caf\xe9"}\n'
                    b'{"id": "\\ud800", "text": "Name a tree."}\n'
                    b'{"id": "s", "text": "bad \\udc00 text"}\n')
    summary = run_job(engine, inp, out, "smollm2", **FAST)
    assert summary.invalid == 1 and "not UTF-8" in summary.errors[0]
    assert "1 invalid (not run: see the errors)" in str(summary)  # it used to be in no count of the summary
    by_id = {r["id"]: r for r in lines(out)}
    assert set(by_id) == {"ok", "\ud800", "s"}
    assert "error" not in by_id["ok"] and "lone surrogate" in by_id["s"]["error"]["message"]
    out.read_bytes().decode("utf-8")  # the output is valid UTF-8 throughout
    # A run again, with --retry-failed: the invalid line is reported again (it has no id to be resumed by),
    # and nothing that is done is redone.
    again = run_job(engine, inp, out, "smollm2", retry_failed=True, **FAST)
    assert (again.invalid, again.skipped, again.done) == (1, 2, 0) and "not UTF-8" in again.errors[0]
