"""vLLM through unillm against raw ``AsyncLLM``, in one run: 16 concurrent requests x 128 new tokens, and one
stream alone, on SmolLM2 (bf16, converted once from the GGUF). Prints aggregate tokens/s, the ratio
(target >= 0.95) and the concurrency scaling (aggregate / single stream). Both engines get the same
``AsyncEngineArgs`` (the ones unillm builds from the registry entry ``smollm2-vllm``).

    python benchmarks/vllm_concurrency.py [--n 16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from unillm import Engine, Registry
from unillm.convert import convert_gguf

PROMPTS = [f"Write a story about animal number {i}." for i in range(64)]


async def raw(n: int, tokens: int) -> tuple[float, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from unillm.backends.vllm import engine_args
    from unillm.system import gpus

    args = engine_args(Registry.load().get("smollm2-vllm"), str(convert_gguf("smollm2")), on_gpu=bool(gpus()))
    eng = AsyncLLM.from_engine_args(args)
    tok = eng.get_tokenizer()

    async def one(i: int) -> int:
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        got = 0
        async for out in eng.generate(TokensPrompt(prompt_token_ids=list(ids)), sp, f"raw-{i}-{time.time_ns()}"):
            got += len(out.outputs[0].token_ids)
        return got

    try:
        await one(63)  # warm-up
        t = time.perf_counter()
        single = await one(0) / (time.perf_counter() - t)
        t = time.perf_counter()
        total = sum(await asyncio.gather(*(one(i) for i in range(1, n + 1))))
        return single, total / (time.perf_counter() - t)
    finally:
        eng.shutdown()


def via_unillm(n: int, tokens: int) -> tuple[float, float]:
    kw = dict(temperature=0.0, max_tokens=tokens, extra={"ignore_eos": True})
    with Engine() as engine:
        engine.load("smollm2-vllm")

        async def one(i: int) -> int:
            r = await engine.achat("smollm2-vllm", PROMPTS[i], **kw)  # type: ignore[arg-type]
            return r.usage.completion_tokens

        async def run() -> tuple[float, float]:
            await one(63)
            t = time.perf_counter()
            single = await one(0) / (time.perf_counter() - t)
            t = time.perf_counter()
            total = sum(await asyncio.gather(*(one(i) for i in range(1, n + 1))))
            return single, total / (time.perf_counter() - t)

        return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    r_single, r_agg = asyncio.run(raw(a.n, a.tokens))
    u_single, u_agg = via_unillm(a.n, a.tokens)
    print(f"SmolLM2-135M bf16 on vLLM, {a.n} concurrent requests x {a.tokens} new tokens (ignore_eos), greedy")
    print(f"{'':34}{'unillm':>12}{'raw AsyncLLM':>16}")
    print(f"{'single stream, tok/s':34}{u_single:>12.1f}{r_single:>16.1f}")
    print(f"{f'{a.n} concurrent, aggregate tok/s':34}{u_agg:>12.1f}{r_agg:>16.1f}")
    print(f"{'scaling (aggregate / single)':34}{u_agg / u_single:>12.2f}{r_agg / r_single:>16.2f}")
    print(f"ratio unillm/raw, aggregate: {u_agg / r_agg:.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
