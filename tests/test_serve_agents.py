"""`unillm serve` for agents: OpenAI's Responses API through the official openai client and the OpenAI
Agents SDK (its default model speaks /v1/responses), Anthropic's Messages API through the official anthropic
client and LangChain's ChatAnthropic; all on the real SmolLM2 over real HTTP. The stream converters' own state
machines are checked beside them on hand-made chunks (unit)."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import httpx
import pytest

from test_ollama_serve import start_server, stop
from unillm.serve import anthropic_api, responses_api
from unillm.types import ChatCompletionChunk, ChunkChoice, Delta, Usage

QUESTION = "What is the capital of France?"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "The weather in a city.", "input_schema": WEATHER}
# Anthropic's current SDK takes no temperature keyword: clients send it in the body.
GREEDY = {"temperature": 0}
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def claude(server):
    anthropic = pytest.importorskip("anthropic")
    with anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0) as client:
        yield client


# -- the Responses API -------------------------------------------------------------------------------------


def test_responses_text_streamed_and_not(oai):
    r = oai.responses.create(model="smollm2", input=QUESTION, instructions="Answer in one sentence.", temperature=0,
                             max_output_tokens=24)
    assert r.object == "response" and r.status == "completed" and "Paris" in r.output_text
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 24
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    events = list(oai.responses.create(model="smollm2", input=QUESTION, instructions="Answer in one sentence.",
                                       temperature=0, max_output_tokens=24, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text and events[-1].response.usage.output_tokens == r.usage.output_tokens
    # The token limit ends it: incomplete, and it says why (streamed, the last event says so too).
    cut = oai.responses.create(model="smollm2", input="Write a long story.", max_output_tokens=5, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 5 and cut.output[0].status == "incomplete"
    last = list(oai.responses.create(model="smollm2", input="Write a long story.", max_output_tokens=5, stream=True))[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"


def test_responses_function_tool_loop_streamed_and_json_schema(oai):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.responses.create(model="smollm2", input=ask, tools=[RESPONSES_TOOL], tool_choice="required", temperature=0,
                             max_output_tokens=60)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    # The call and its output go back as items of the next turn's input; the model reads the result.
    after = oai.responses.create(model="smollm2", input=[*ask, call.model_dump(exclude_none=True),
                                                         {"type": "function_call_output", "call_id": call.call_id,
                                                          "output": "Sunny, 22 degrees."}],
                                 tools=[RESPONSES_TOOL], tool_choice="none", temperature=0, max_output_tokens=40)
    assert after.status == "completed" and after.output[0].type == "message"
    bare = oai.responses.create(model="smollm2", input=ask, tools=[RESPONSES_TOOL], tool_choice="none", max_output_tokens=1)
    assert after.usage.input_tokens > bare.usage.input_tokens + 20  # the call and its result are in the prompt
    events = list(oai.responses.create(model="smollm2", input=ask, tools=[RESPONSES_TOOL], tool_choice="required",
                                       temperature=0, max_output_tokens=60, stream=True))
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas == done.arguments == call.arguments and events[-1].type == "response.completed"
    j = oai.responses.create(model="smollm2", input="Name a city in France and its country.", temperature=0,
                             max_output_tokens=60, text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}})
    assert set(json.loads(j.output_text)) == {"city", "country"}


def test_responses_previous_response_id_retrieve_delete_and_refusals(oai, server):
    openai = pytest.importorskip("openai")
    first = oai.responses.create(model="smollm2", input="My name is Ada.", max_output_tokens=8, temperature=0)
    alone = oai.responses.create(model="smollm2", input="What is my name?", max_output_tokens=8, temperature=0)
    after = oai.responses.create(model="smollm2", input="What is my name?", previous_response_id=first.id,
                                 max_output_tokens=8, temperature=0)
    assert after.previous_response_id == first.id
    assert after.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens  # the earlier turn is read
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    unstored = oai.responses.create(model="smollm2", input="Hi", max_output_tokens=2, store=False)
    oai.responses.delete(first.id)
    for rid in (first.id, unstored.id):
        with pytest.raises(openai.NotFoundError):
            oai.responses.retrieve(rid)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model="smollm2", input="Hi", previous_response_id=first.id)
    for extra, named in [({"tools": [{"type": "web_search"}]}, "web_search"),
                         ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input_image"),
                         ({"reasoning": {"effort": "high"}}, "reasoning"), ({"truncation": "auto"}, "truncation"),
                         ({"background": True}, "background"), ({"top_k": 3}, "top_k"),
                         ({"include": ["file_search_call.results"]}, "file_search_call.results")]:
        r = httpx.post(server + "/v1/responses", json={"model": "smollm2", "input": "Hi", **extra}, timeout=60)
        assert r.status_code == 400 and named in r.json()["error"]["message"], extra


def test_agents_sdk_default_responses_model_with_a_tool_and_an_output_type(server):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI
    from pydantic import BaseModel

    asked = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"Sunny in {city}."

    class City(BaseModel):
        city: str
        country: str

    async def run():
        agents.set_tracing_disabled(True)
        client = AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
        model = agents.OpenAIResponsesModel("smollm2", client)  # what Agent(model="smollm2") makes by default
        tools = agents.Agent(name="weather", instructions="Use the tool.", model=model, tools=[get_weather],
                             model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60))
        weather = await agents.Runner.run(tools, "What is the weather in Paris?", max_turns=4)
        typed = agents.Agent(name="city", instructions="Name a city.", model=model, output_type=City,
                             model_settings=agents.ModelSettings(temperature=0, max_tokens=60))
        city = await agents.Runner.run(typed, "A city in France.")
        await client.close()
        return weather, city

    weather, city = asyncio.run(run())
    assert asked == ["Paris"] and isinstance(weather.final_output, str) and weather.final_output
    assert isinstance(city.final_output, City) and city.final_output.country


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_langchain_and_llamaindex_on_the_responses_api(server):
    lc = pytest.importorskip("langchain_openai")
    li = pytest.importorskip("llama_index.llms.openai")
    from langchain_core.tools import tool
    from llama_index.core.llms import ChatMessage

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "Sunny."

    llm = lc.ChatOpenAI(model="smollm2", base_url=server + "/v1", api_key="unused", use_responses_api=True,
                        temperature=0, max_tokens=24, max_retries=0)
    said = llm.invoke([("system", "Answer in one sentence."), ("human", QUESTION)])
    assert "Paris" in said.text and said.usage_metadata["output_tokens"] > 0
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("get_weather", {"city": "Paris"})]
    index = li.OpenAIResponses(model="smollm2", api_base=server + "/v1", api_key="unused", temperature=0,
                               max_output_tokens=24, max_retries=0, context_window=2048)
    ask = [ChatMessage(role="system", content="Answer in one sentence."), ChatMessage(role="user", content=QUESTION)]
    answer = index.chat(ask).message.content
    assert "Paris" in answer and "".join(c.delta or "" for c in index.stream_chat(ask)) == answer
    del llm, index  # the frameworks never close their HTTP clients: collected here, not in a later test
    gc.collect()


# -- the Messages API --------------------------------------------------------------------------------------


def test_anthropic_messages_streamed_and_not_with_stop_sequences(claude):
    m = claude.messages.create(model="smollm2", max_tokens=24, extra_body=GREEDY, system="Answer in one sentence.",
                               messages=[{"role": "user", "content": QUESTION}])
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "end_turn" and m.stop_sequence is None
    assert "Paris" in m.content[0].text and m.usage.output_tokens > 0
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 10
    with claude.messages.stream(model="smollm2", max_tokens=24, extra_body=GREEDY, system="Answer in one sentence.",
                                messages=[{"role": "user", "content": QUESTION}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text and final.stop_reason == "end_turn" and final.usage.output_tokens == m.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens
    stopped = claude.messages.create(model="smollm2", max_tokens=24, extra_body=GREEDY, stop_sequences=["Paris"],
                                     system="Answer in one sentence.", messages=[{"role": "user", "content": QUESTION}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert "Paris" not in stopped.content[0].text
    cut = claude.messages.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "Write a long story."}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 4


def test_anthropic_tool_use_loop_streamed_and_count_tokens(claude):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = claude.messages.create(model="smollm2", max_tokens=60, extra_body=GREEDY, messages=ask, tools=[ANTHROPIC_TOOL],
                               tool_choice={"type": "tool", "name": "get_weather"})
    (use,) = m.content
    assert m.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    with claude.messages.stream(model="smollm2", max_tokens=60, extra_body=GREEDY, messages=ask, tools=[ANTHROPIC_TOOL],
                                tool_choice={"type": "any"}) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and [(b.type, b.input) for b in final.content] == [("tool_use", {"city": "Paris"})]
    turn = [*ask, {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 22 degrees."}]}]
    after = claude.messages.create(model="smollm2", max_tokens=40, extra_body=GREEDY, messages=turn, tools=[ANTHROPIC_TOOL],
                                   tool_choice={"type": "none"})
    assert after.stop_reason in ("end_turn", "max_tokens") and after.content[0].type == "text"
    failed = [*turn[:2], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "is_error": True,
                                                       "content": [{"type": "text", "text": "Sunny, 22 degrees."}]}]}]
    # count_tokens counts what the call reads: the template, the tools' instructions, the error mark.
    for messages, tools in [(ask, []), (turn, [ANTHROPIC_TOOL]), (failed, [ANTHROPIC_TOOL])]:
        counted = claude.messages.count_tokens(model="smollm2", messages=messages, tools=tools).input_tokens
        read = claude.messages.create(model="smollm2", max_tokens=1, messages=messages, tools=tools).usage
        assert counted == read.input_tokens + read.cache_read_input_tokens
    assert claude.messages.count_tokens(model="smollm2", messages=failed, tools=[ANTHROPIC_TOOL]).input_tokens > \
        claude.messages.count_tokens(model="smollm2", messages=turn, tools=[ANTHROPIC_TOOL]).input_tokens


def test_anthropic_errors_in_anthropics_shape(claude, server):
    anthropic = pytest.importorskip("anthropic")
    hi = [{"role": "user", "content": "Hi"}]
    for kw, named in [({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "image"),
                      ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
                      ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
                      ({"messages": [*hi, {"role": "assistant", "content": "The answer is"}]}, "prefill")]:
        with pytest.raises(anthropic.BadRequestError) as err:
            claude.messages.create(model="smollm2", max_tokens=5, **{"messages": hi, **kw})
        assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
        assert named in err.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=5, messages=hi)
    assert missing.value.body["error"]["type"] == "not_found_error" and "no-such-model" in missing.value.body["error"]["message"]
    r = httpx.post(server + "/v1/messages", json={"model": "smollm2", "messages": hi}, timeout=60)  # max_tokens is required
    assert r.status_code == 400 and r.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    window = httpx.post(server + "/v1/messages", json={"model": "smollm2", "max_tokens": 5, "messages": [
        {"role": "user", "content": "word " * 3000}]}, timeout=60)
    assert window.status_code == 400 and "context window" in window.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"max_tokens": 400, "messages": [{"role": "user", "content": "Write a long story."}]}),
    ("/v1/responses", {"max_output_tokens": 400, "input": "Write a long story."})])
def test_a_stream_whose_client_leaves_is_cancelled(server, path, body):
    """The same admission as chat: a client that closes a stream stops its generation."""
    def cancelled() -> int:
        return httpx.get(server + "/unillm/stats").json()["requests"].get("cancelled", 0)

    before = cancelled()
    with httpx.stream("POST", server + path, json={"model": "smollm2", "stream": True, "temperature": 0, **body}, timeout=60) as r:
        for line in r.iter_lines():
            if "delta" in line:
                break
    deadline = time.time() + 30
    while cancelled() == before and time.time() < deadline:
        time.sleep(0.1)
    assert cancelled() == before + 1


def test_langchain_chat_anthropic(server):
    lc = pytest.importorskip("langchain_anthropic")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "Sunny."

    llm = lc.ChatAnthropic(model="smollm2", base_url=server, api_key="unused", max_tokens=24, temperature=0, max_retries=0)
    ask = [("system", "Answer in one sentence."), ("human", QUESTION)]
    said = llm.invoke(ask)
    assert "Paris" in said.content and said.usage_metadata["output_tokens"] > 0
    streamed = "".join(c.text for c in llm.stream(ask))
    assert streamed == said.content
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("get_weather", {"city": "Paris"})]


# -- the coding agents' requests, as captured from Claude Code 2.1.328 and Codex CLI 0.169 (contents cut short) --


def events_of(response: httpx.Response) -> list[dict]:
    """The SSE events of a response: each ``event:`` name checked against its data's ``type``."""
    out, name = [], None
    for line in response.text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            out.append(data)
    return out


def test_claude_codes_request_shape(server):
    body = {
        "model": "smollm2", "max_tokens": 24, "stream": True, "temperature": 0,
        "system": [{"type": "text", "text": "You are Claude Code."},
                   {"type": "text", "text": "Answer in one sentence.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>Be brief.</system-reminder>"},
                                                  {"type": "text", "text": QUESTION, "cache_control": {"type": "ephemeral"}}]},
                     {"role": "system", "content": [{"type": "text", "text": "# Environment\nPlatform: linux"}]}],
        "tools": [dict(ANTHROPIC_TOOL, name="Read"), dict(ANTHROPIC_TOOL, name="DeferredToolPlaceholder", defer_loading=True)],
        "metadata": {"user_id": '{"device_id":"d","session_id":"s"}'},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
    }
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,context-management-2025-06-27",
               "x-api-key": "unused"}
    r = httpx.post(server + "/v1/messages?beta=true", json=body, headers=headers, timeout=120)
    events = events_of(r)
    assert r.status_code == 200 and events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert events[-2]["delta"]["stop_reason"] in ("end_turn", "tool_use", "max_tokens")
    counted = httpx.post(server + "/v1/messages/count_tokens", json={k: body[k] for k in (
        "model", "system", "messages", "tools", "thinking", "context_management", "output_config")}, timeout=60).json()
    alone = httpx.post(server + "/v1/messages/count_tokens", json={k: body[k] for k in ("model", "system", "messages")}, timeout=60).json()
    with_both = httpx.post(server + "/v1/messages/count_tokens", json={**{k: body[k] for k in ("model", "system", "messages")},
                           "tools": [dict(ANTHROPIC_TOOL, name="Read"), dict(ANTHROPIC_TOOL, name="Other")]}, timeout=60).json()
    assert alone["input_tokens"] < counted["input_tokens"] < with_both["input_tokens"]  # the deferred tool is left out
    for field, value in [("thinking", {"type": "enabled", "budget_tokens": 2048}), ("output_config", {"effort": "low"}),
                         ("context_management", {"edits": [{"type": "clear_tool_uses_20250919"}]})]:
        refused = httpx.post(server + "/v1/messages", json={**body, "stream": False, field: value}, timeout=60)
        assert refused.status_code == 400 and field in refused.json()["error"]["message"], field


def test_codexs_request_shape(server):
    body = {
        "model": "smollm2", "stream": True, "store": False, "tool_choice": "auto", "parallel_tool_calls": True,
        "instructions": None, "max_output_tokens": 40, "temperature": 0,
        "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context/>"}]},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Call close_agent for agent 7."}]}],
        "tools": [dict(RESPONSES_TOOL, name="exec_command", strict=False),
                  {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [
                      {"type": "function", "name": "close_agent", "strict": False, "description": "Close an agent.",
                       "parameters": {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}}]}],
        "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1",
        "client_metadata": {"thread_id": "thread-1"},
    }
    events = events_of(httpx.post(server + "/v1/responses", json=body, timeout=120))
    assert events[0]["type"] == "response.created" and events[-1]["type"] in ("response.completed", "response.incomplete")
    forced = httpx.post(server + "/v1/responses", json={**body, "stream": False, "max_output_tokens": 60,
                                                        "tool_choice": {"type": "function", "name": "multi_agent_v1.close_agent"}}, timeout=120).json()
    (call,) = forced["output"]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "close_agent", "multi_agent_v1")
    # The call goes back with its namespace, and the model reads it as the function it called.
    after = httpx.post(server + "/v1/responses", json={**body, "stream": False, "input": body["input"] + [
        call, {"type": "function_call_output", "call_id": call["call_id"], "output": "closed"}]}, timeout=120)
    assert after.status_code == 200 and after.json()["status"] in ("completed", "incomplete")
    refused = httpx.post(server + "/v1/responses", json={**body, "tools": [*body["tools"], {"type": "web_search", "external_web_access": False}]}, timeout=60)
    assert refused.status_code == 400 and "web_search" in refused.json()["error"]["message"]


# -- the converters' state machines, on hand-made chunks ---------------------------------------------------


def chunks(*deltas: Delta, finish: str = "tool_calls") -> list[ChatCompletionChunk]:
    out = [ChatCompletionChunk("chatcmpl-1", "m", "fake", [ChunkChoice(0, d)]) for d in deltas]
    out.append(ChatCompletionChunk("chatcmpl-1", "m", "fake", [ChunkChoice(0, Delta(None, ""), finish)], usage=Usage(10, 5, 4)))
    return out


def call(i: int, args: str, name: str | None = None) -> dict:
    return {"index": i, "function": {"arguments": args}, **({"id": f"call_{i}", "function": {"name": name, "arguments": args}} if name else {})}


# Text, a first call streamed in pieces, a second one, then the first call's last piece and more text: as the
# engine's stream shaper can send them (it holds a call's last "}" until the end).
TWO_CALLS = chunks(Delta("assistant", "Let me check."), Delta(None, None, [call(0, '{"city": "Pa', "get_weather")]),
                   Delta(None, None, [call(1, '{"city": "Rome"', "get_weather")]),
                   Delta(None, " Done.", [call(0, 'ris"}'), call(1, "}")]))


@pytest.mark.unit
def test_anthropic_events_keep_blocks_in_sequence():
    conv = anthropic_api.Events("m", single=False, asked=[])
    events = [e for c in TWO_CALLS for e in conv(c)]
    open_, blocks = None, []
    for e in events:  # a delta goes to the one open block; blocks open one after another
        if e["type"] == "content_block_start":
            assert open_ is None and e["index"] == len(blocks)
            open_ = e["index"]
            blocks.append(dict(e["content_block"], json=""))
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_
            d = e["delta"]
            if d["type"] == "text_delta":
                blocks[open_]["text"] += d["text"]
            else:
                blocks[open_]["json"] += d["partial_json"]
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_
            open_ = None
    assert events[0]["type"] == "message_start" and [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"]
    assert [(b["type"], b.get("text"), b["json"]) for b in blocks] == [
        ("text", "Let me check.", ""), ("tool_use", None, '{"city": "Paris"}'), ("tool_use", None, '{"city": "Rome"}'),
        ("text", " Done.", "")]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"input_tokens": 6, "output_tokens": 5, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0}
    single = anthropic_api.Events("m", single=True, asked=[])
    used = [e["content_block"] for c in TWO_CALLS for e in single(c) if e["type"] == "content_block_start"]
    assert [b["type"] for b in used] == ["text", "tool_use", "text"]  # disable_parallel_tool_use: one call


@pytest.mark.unit
def test_responses_events_build_the_final_output():
    done = []
    conv = responses_api.Events(responses_api.Answer({"model": "m", "input": "x"}, "m"), done.append)
    events = [e for c in TWO_CALLS for e in conv(c)]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and done == [final]
    assert [(i["type"], i.get("arguments")) for i in final["output"]] == [
        ("message", None), ("function_call", '{"city": "Paris"}'), ("function_call", '{"city": "Rome"}')]
    assert final["output"][0]["content"][0]["text"] == "Let me check. Done."
    for item_at, item in enumerate(final["output"]):  # every item was added, then done, once
        assert [e["type"] for e in events if e.get("output_index") == item_at and e["type"].startswith("response.output_item")] == [
            "response.output_item.added", "response.output_item.done"]
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 4} and final["usage"]["total_tokens"] == 15


@pytest.mark.unit
def test_input_items_and_blocks_become_chat_messages():
    msgs = responses_api.input_messages([
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look it up."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny."}])
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": "Checking.", "reasoning_content": "Look it up.", "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "Sunny."}]
    chat = anthropic_api.chat_messages([{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}], [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "...", "signature": "s"},
                                          {"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny.", "is_error": True},
                                     {"type": "text", "text": "Thanks."}]}])
    assert chat == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
                     "reasoning_content": "..."},
                    {"role": "tool", "tool_call_id": "t1", "content": "Error: Sunny."}, {"role": "user", "content": "Thanks."}]
