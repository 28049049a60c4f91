"""Batch throughput: ``Engine.batch`` against sequential ``llama_cpp.Llama.create_chat_completion``.

32 documents x 128 new tokens, greedy, on the embedded SmolLM2 GGUF, in one run. The baseline is the
plain loop a user would write, with llama-cpp-python's default threads (half the CPUs) and, to be fair to it,
also with all CPUs. unillm's default registry entry decodes 8 sequences per step (``options.parallel: 8``).
Target: >= 2x the fastest sequential loop (all CPUs), in each of three runs.

    python benchmarks/batch_throughput.py [--docs 32] [--tokens 128] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import time

from _common import direct_llama

from unillm import Engine
from unillm.system import cpu_count

TOPICS = ["a lighthouse keeper", "a river town", "a mountain railway", "an old library", "a desert market",
          "a winter harbour", "a clockmaker", "a forest school"]


def docs(n: int) -> list[str]:
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (story number {i})." for i in range(n)]


def sequential(prompts: list[str], tokens: int, threads: int | None) -> tuple[int, float]:
    llm = direct_llama()
    if threads is not None:
        llm.close()
        import llama_cpp

        from _common import smollm2_path

        llm = llama_cpp.Llama(model_path=smollm2_path(), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                              chat_format="chat_template.default", verbose=False)
    t0 = time.perf_counter()
    n = 0
    for p in prompts:
        r = llm.create_chat_completion([{"role": "user", "content": p}], temperature=0.0, max_tokens=tokens)
        n += r["usage"]["completion_tokens"]
    dt = time.perf_counter() - t0
    llm.close()
    return n, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="each run measures all three, in turn")
    args = ap.parse_args()
    prompts = docs(args.docs)
    print(f"{args.docs} documents x {args.tokens} new tokens max, greedy, SmolLM2-135M Q4_1, {os.cpu_count()} CPUs")
    ratios: list[tuple[float, float]] = []
    for run in range(1, args.runs + 1):
        with Engine() as engine:
            engine.load("smollm2")
            info = engine.backend("smollm2").info()  # type: ignore[union-attr]
            t0 = time.perf_counter()
            results = engine.batch("smollm2", prompts, max_tokens=args.tokens, temperature=0.0, progress=False)
            b_dt = time.perf_counter() - t0
        b_n = sum(r.response.usage.completion_tokens for r in results if r.response)
        s_n, s_dt = sequential(prompts, args.tokens, None)
        a_n, a_dt = sequential(prompts, args.tokens, cpu_count())
        rows = [
            (f"unillm Engine.batch (parallel={info['parallel']}, {info['n_threads']} threads)", b_n, b_dt),
            (f"sequential create_chat_completion ({max(1, cpu_count() // 2)} thread, default)", s_n, s_dt),
            (f"sequential create_chat_completion ({cpu_count()} threads)", a_n, a_dt),
        ]
        print(f"run {run}:{'':55}{'tokens':>8}{'seconds':>10}{'tok/s':>9}")
        for label, n, dt in rows:
            print(f"  {label:60}{n:>8}{dt:>10.1f}{n / dt:>9.1f}")
        ratios.append(((b_n / b_dt) / (s_n / s_dt), (b_n / b_dt) / (a_n / a_dt)))
        print(f"  ratio vs default sequential: {ratios[-1][0]:.2f}x; vs all-CPU sequential (the best loop): "
              f"{ratios[-1][1]:.2f}x (target >= 2x)")
    best = [r[1] for r in ratios]
    print(f"vs the best loop over {len(best)} runs: " + ", ".join(f"{r:.2f}x" for r in best)
          + f" (lowest {min(best):.2f}x)")


if __name__ == "__main__":
    main()
