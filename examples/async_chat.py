"""The async API: many questions at once against one model (they share its batch).

    python examples/async_chat.py
"""

import asyncio

from unillm import Engine

QUESTIONS = ["Name a fruit.", "Name a colour.", "Name a planet.", "Name a musical instrument."]


async def main() -> None:
    async with Engine() as engine:
        answers = await asyncio.gather(*(engine.achat("smollm2", q, max_tokens=24, temperature=0) for q in QUESTIONS))
        for q, a in zip(QUESTIONS, answers):
            print(f"{q} -> {a.text!r} ({a.timings.decode_tokens_per_s or 0:.0f} tok/s)")
        async for chunk in await engine.achat("smollm2", "Count to five.", stream=True, max_tokens=24):
            print(chunk.text, end="", flush=True)
        print()


if __name__ == "__main__":
    asyncio.run(main())
