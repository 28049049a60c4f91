"""unillm in-process against the seed's network path: llama.cpp's OpenAI server + the OpenAI client.

Starts ``python -m llama_cpp.server`` on 127.0.0.1 with the same GGUF and settings, then streams the same
greedy prompts through the OpenAI client and through ``Engine.chat(stream=True)``: time to first token
and decode throughput side by side. Needs ``pip install -e '.[bench]'``.

    python benchmarks/vs_gateway.py [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

from _common import PROMPTS, med, smollm2_path

from unillm import Engine
from unillm.system import default_threads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_stats(start) -> tuple[float, int, float]:
    """(TTFT seconds, content pieces, decode pieces/s) of the stream that ``start()`` opens.

    The clock starts before the call: ``Engine.chat(stream=True)`` returns once the first chunk exists.
    """
    t0 = time.perf_counter()
    chunks = start()
    first = None
    n = 0
    for text in chunks:
        if text:
            n += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    return (first or end) - t0, n, (n - 1) / (end - first) if first and n > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from openai import OpenAI

    port = free_port()
    threads = str(default_threads())
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--n_threads", threads, "--n_threads_batch", threads,
         "--chat_format", "chat_template.default", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("llama_cpp.server did not start")
                time.sleep(0.5)
        engine = Engine()
        engine.load("smollm2")
        kw = dict(temperature=0.0, max_tokens=args.tokens, seed=0)

        def via_gateway(p: str):
            def start():
                s = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}], stream=True, **kw)
                return (c.choices[0].delta.content if c.choices else "" for c in s)

            return stream_stats(start)

        def via_unillm(p: str):
            return stream_stats(lambda: (c.text for c in engine.chat("smollm2", [{"role": "user", "content": p}], stream=True, **kw)))

        for p in PROMPTS:
            via_gateway(p), via_unillm(p)
        res: dict[str, list[tuple[float, int, float]]] = {"unillm": [], "gateway": []}
        for _ in range(args.rounds):
            for p in PROMPTS:
                res["unillm"].append(via_unillm(p))
                res["gateway"].append(via_gateway(p))
        engine.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"{len(res['unillm'])} streamed calls each, greedy, {args.tokens} tokens max, SmolLM2-135M Q4_1, {threads} thread(s)")
    print(f"{'':32}{'unillm in-process':>20}{'llama_cpp.server + OpenAI':>28}")
    for label, idx, fmt in (("TTFT, median (ms)", 0, "{:.1f}"), ("decode pieces/s, median", 2, "{:.1f}")):
        u = med([r[idx] for r in res["unillm"]]) * (1000 if idx == 0 else 1)
        g = med([r[idx] for r in res["gateway"]]) * (1000 if idx == 0 else 1)
        print(f"{label:32}{fmt.format(u):>20}{fmt.format(g):>28}")
    print(f"{'pieces streamed':32}{sum(r[1] for r in res['unillm']):>20}{sum(r[1] for r in res['gateway']):>28}")


if __name__ == "__main__":
    main()
