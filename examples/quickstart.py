"""Chat, stream, switch models by name, and fall back when a model cannot run here.

    python examples/quickstart.py
"""

from unillm import Engine

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

if __name__ == "__main__":
    with Engine(fallbacks=True) as engine:
        r = engine.chat("smollm2", QUESTION, temperature=0)
        print("answer:", r.text)
        print(f"usage: {r.usage.to_dict()}; TTFT {r.timings.ttft_s:.3f} s; load {r.timings.load_s:.2f} s")

        print("streamed: ", end="")
        for chunk in engine.chat("smollm2", "Write a haiku about rivers.", stream=True, max_tokens=48):
            print(chunk.text, end="", flush=True)
        print()

        # Moving between models is changing the name. On a machine without a GPU the guide's code model
        # cannot run; with fallbacks on, the call goes down its registry fallbacks and says so.
        r = engine.chat("qwen-coder-vllm", "Write a Python function that adds two numbers.", max_tokens=64)
        print(f"asked for qwen-coder-vllm, served by {r.model}" + (f" because: {r.fallback_reason}" if r.fallback_reason else ""))
        print(r.text)
