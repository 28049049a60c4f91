"""A batch job on Ray against the same job in one process, on this machine, in one run.

The same 64 documents (greedy, ``--tokens`` new tokens each, the embedded SmolLM2 GGUF) through
``run_job`` three ways: locally (one Engine, all CPUs), on a local Ray instance with 1 replica holding all
CPUs, and with 2 replicas of one CPU each. Each run starts from nothing (its own Engine or its own Ray
instance), so the start-up column is what a user waits for before the first record lands: model load, plus
for Ray the instance, the actor pool and one model load per replica. The steady columns count from the first
record to the last. Per-record overhead is Ray's steady seconds per record minus the local job's.

    python benchmarks/ray_batch.py [--docs 64] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)

from unillm import Engine
from unillm.cluster import RayConfig
from unillm.jobs import run_job
from unillm.system import cpu_count

TOPICS = ["a lighthouse keeper", "a river town", "a mountain railway", "an old library", "a desert market",
          "a winter harbour", "a clockmaker", "a forest school"]


def write_docs(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"d{i}", "text": f"Write a short story about {TOPICS[i % 8]} (number {i})."}) + "\n")


def run(src: Path, out: Path, tokens: int, ray: RayConfig | None) -> tuple[float, int, int]:
    """Seconds, records and tokens of one job, from nothing (its own Engine, its own Ray instance)."""
    t0 = time.perf_counter()
    with Engine() as engine:
        summary = run_job(engine, src, out, "smollm2", ray=ray, progress=False, max_tokens=tokens, temperature=0.0)
    assert summary.done == summary.total, summary
    return time.perf_counter() - t0, summary.total, summary.completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    cpus = cpu_count()
    runs = {
        "local (1 process)": None,
        f"ray, 1 replica x {cpus} CPU": RayConfig(replicas=1, cpus=cpus),
        f"ray, {cpus} replicas x 1 CPU": RayConfig(replicas=cpus, cpus=1),
    }
    results = {}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.jsonl"
        write_docs(src, args.docs)
        answers = {}
        one = Path(d) / "one.jsonl"
        write_docs(one, 1)
        for i, (name, ray) in enumerate(runs.items()):
            startup, _, _ = run(one, Path(d) / f"one{i}.jsonl", 1, ray)  # the fixed cost: one record, one token
            total, n, tokens = run(src, Path(d) / f"{i}.jsonl", args.tokens, ray)
            steady = max(total - startup, 1e-9)
            results[name] = {"total_s": total, "startup_s": startup, "rec_s": n / steady, "tok_s": tokens / steady,
                             "per_record_s": steady / n}
            answers[name] = {json.loads(line)["id"]: json.loads(line)["answer"]
                             for line in (Path(d) / f"{i}.jsonl").read_text().splitlines()}
    base = results["local (1 process)"]
    print(f"{args.docs} documents, {args.tokens} new tokens each (greedy), SmolLM2-135M Q4_1, {cpus} CPUs")
    print(f"{'run':<26} {'total s':>8} {'start-up s':>11} {'records/s':>10} {'tok/s':>8} {'vs local':>9} {'overhead/record':>16}")
    for name, r in results.items():
        per = r["per_record_s"] - base["per_record_s"]
        print(f"{name:<26} {r['total_s']:>8.1f} {r['startup_s']:>11.1f} {r['rec_s']:>10.2f} {r['tok_s']:>8.1f} "
              f"{r['tok_s'] / base['tok_s']:>8.2f}x {per * 1000:>+13.0f} ms")
    print("start-up: a job of one record and one token, from nothing; records/s and tok/s: the 64-document job's "
          "time less that start-up")
    same = [name for name in answers if answers[name] == answers["local (1 process)"]]
    print(f"greedy answers identical to the local job's: {', '.join(same)}")


if __name__ == "__main__":
    main()
