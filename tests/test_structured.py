"""Structured output and tool calls on the real SmolLM2 GGUF: the batched default and the one-sequence path.

Every JSON answer is checked with jsonschema here, independently of unillm's own check."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from conftest import GREEDY, counts
from unillm import InvalidRequestError, StructuredOutputError
from unillm.params import PARAMS

CITY = [
    {"role": "system", "content": "You are a helpful assistant. Answer in JSON."},
    {"role": "user", "content": "Describe Paris, the capital of France."},
]

#: An integer range. llama-cpp-python's JSON-schema-to-GBNF converter does not enforce minimum/maximum
#: (xgrammar, under vLLM and transformers, does): SmolLM2 answers 1232 here, which unillm's check refuses.
CENTURY = {
    "type": "object",
    "properties": {"size": {"type": "string", "enum": ["small", "medium", "large"]},
                   "founded_century": {"type": "integer", "minimum": 1, "maximum": 21}},
    "required": ["size", "founded_century"],
}

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "location": {
                "type": "object",
                "properties": {"country": {"type": "string"}, "continent": {"type": "string"}},
                "required": ["country", "continent"],
            },
        },
        "required": ["city", "location"],
    },
    "bounded_array": {
        "type": "object",
        "properties": {"landmarks": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3}},
        "required": ["landmarks"],
    },
    "enum_and_integer": {
        "type": "object",
        "properties": {
            "size": {"type": "string", "enum": ["small", "medium", "large"]},
            "arrondissements": {"type": "integer"},
        },
        "required": ["size", "arrondissements"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "nickname": {"type": "string"}, "rivers": {"type": "integer"}},
        "required": ["name"],
    },
}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def weather_tool() -> dict:
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    }


def time_tool() -> dict:
    return {"type": "function", "function": {"name": "get_time", "description": "The local time in a time zone.",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(params=["batched", "single"])
def model(request, engine, single_engine):
    """(engine, model): the default model (16-slot continuous batcher) and the one-sequence path."""
    return (engine, "smollm2") if request.param == "batched" else (single_engine, "smollm2-single")


# -- response_format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SCHEMAS))
def test_json_schema_answers_validate(model, shape):
    eng, name = model
    schema = SCHEMAS[shape]
    r = eng.chat(name, CITY, max_tokens=200, response_format=json_schema(schema), **GREEDY)
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert r.choices[0].message.parsed == value
    assert r.finish_reason == "stop"


def test_integer_range_outside_what_the_grammar_enforces_is_refused(model):
    eng, name = model
    with pytest.raises(StructuredOutputError) as e:
        eng.chat(name, CITY, max_tokens=200, response_format=json_schema(CENTURY), **GREEDY)
    assert "maximum of 21" in str(e.value) and "founded_century" in str(e.value)
    jsonschema.validate(json.loads(e.value.text), {**CENTURY, "properties": {**CENTURY["properties"], "founded_century": {"type": "integer"}}})


def test_pydantic_class_gives_an_instance(model):
    class Landmark(BaseModel):
        name: str
        year_built: int = Field(ge=1000, le=2025)

    class City(BaseModel):
        name: str
        country: str
        kind: Literal["capital", "town"]
        landmarks: list[Landmark] = Field(min_length=1, max_length=2)

    eng, name = model
    r = eng.chat(name, CITY, max_tokens=200, response_format=City, **GREEDY)
    city = r.choices[0].message.parsed
    assert isinstance(city, City)
    assert city == City.model_validate_json(r.text)
    jsonschema.validate(json.loads(r.text), City.model_json_schema())


def test_json_object_is_an_object(engine):
    question = [CITY[0], {"role": "user", "content": "Give the name and the country of the capital of France."}]
    r = engine.chat("smollm2", question, max_tokens=120, response_format={"type": "json_object"}, **GREEDY)
    assert isinstance(json.loads(r.text), dict)
    assert r.choices[0].message.parsed == json.loads(r.text)


def test_text_response_format_is_plain_text(engine):
    plain = engine.chat("smollm2", CITY, max_tokens=16, **GREEDY)
    r = engine.chat("smollm2", CITY, max_tokens=16, response_format={"type": "text"}, **GREEDY)
    assert r.text == plain.text and r.choices[0].message.parsed is None


def test_stream_of_json_equals_the_answer(model):
    eng, name = model
    fmt = json_schema(SCHEMAS["nested"])
    full = eng.chat(name, CITY, max_tokens=200, response_format=fmt, **GREEDY)
    chunks = list(eng.chat(name, CITY, max_tokens=200, response_format=fmt, stream=True, **GREEDY))
    assert len(chunks) > 3
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == "stop" and counts(chunks[-1].usage) == counts(full.usage)


def test_budget_ending_inside_the_json_is_an_error_not_an_answer(model):
    eng, name = model
    with pytest.raises(StructuredOutputError) as e:
        eng.chat(name, CITY, max_tokens=6, response_format=json_schema(SCHEMAS["nested"]), **GREEDY)
    assert "max_tokens" in str(e.value) and e.value.model == name
    assert e.value.text and not e.value.text.rstrip().endswith("}")
    with pytest.raises(StructuredOutputError):
        list(eng.chat(name, CITY, max_tokens=6, response_format=json_schema(SCHEMAS["nested"]), stream=True, **GREEDY))
    assert "Paris" in eng.chat(name, CITY, max_tokens=200, response_format=json_schema(SCHEMAS["nested"]), **GREEDY).text


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"response_format": json_schema({"type": "object", "properties": {"a": {"type": "strng"}}})}, "not a valid JSON schema"),
        ({"response_format": {"type": "json_schema"}}, "json_schema needs"),
        ({"response_format": {"type": "xml"}}, "'xml'"),
        ({"response_format": "json"}, "response_format must be"),
        ({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [weather_tool(), weather_tool()]}, "duplicate"),
        ({"tools": [weather_tool()], "response_format": {"type": "json_object"}}, "response_format and tools"),
        ({"response_format": {"type": "json_object"}, "extra": {"grammar": 'root ::= "x"'}}, "both constrain"),
    ],
)
def test_bad_structure_requests_are_refused(engine, kwargs, fragment):
    with pytest.raises(InvalidRequestError) as e:
        engine.chat("smollm2", CITY, max_tokens=8, **kwargs)
    assert fragment in str(e.value)
    assert "Paris" in engine.chat("smollm2", CITY, max_tokens=200, response_format=json_schema(SCHEMAS["nested"]), **GREEDY).text


# -- tools ------------------------------------------------------------------------------------------------


def check_call(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_required_tool_call(model):
    eng, name = model
    r = eng.chat(name, WEATHER_Q, max_tokens=80, tools=[weather_tool()], tool_choice="required", **GREEDY)
    msg = r.choices[0].message
    assert r.finish_reason == "tool_calls" and msg.content is None and len(msg.tool_calls) == 1
    args = check_call(msg.tool_calls[0], weather_tool())
    assert "Paris" in args["city"]
    d = r.to_dict()["choices"][0]
    assert d["finish_reason"] == "tool_calls" and d["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_named_tool_call_picks_that_tool(model):
    eng, name = model
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = eng.chat(name, WEATHER_Q, max_tokens=80, tools=[weather_tool(), time_tool()], tool_choice=choice, **GREEDY)
    check_call(r.choices[0].message.tool_calls[0], time_tool())


def test_tool_choice_none_answers_in_text(engine):
    plain = engine.chat("smollm2", WEATHER_Q, max_tokens=24, **GREEDY)
    r = engine.chat("smollm2", WEATHER_Q, max_tokens=24, tools=[weather_tool()], tool_choice="none", **GREEDY)
    assert r.choices[0].message.tool_calls is None and r.finish_reason in ("stop", "length")
    assert r.text == plain.text  # "none" renders no tools


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def pinned(text: str) -> dict:
    """extra= that pins the model's output to ``text`` (a GBNF grammar of one literal)."""
    return {"grammar": f"root ::= {json.dumps(text)}"}


def test_auto_reads_the_models_own_call_format(model):
    """``auto`` reads a call that the model writes in its own format. SmolLM2-135M rarely chooses to call, so
    its output is pinned to the Hermes format with a GBNF grammar: the parsing is what is under test."""
    eng, name = model
    r = eng.chat(name, WEATHER_Q, max_tokens=80, tools=[weather_tool()], extra=pinned("Let me check." + HERMES_CALL), **GREEDY)
    msg = r.choices[0].message
    assert r.finish_reason == "tool_calls" and msg.content == "Let me check."
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    chunks = list(eng.chat(name, WEATHER_Q, max_tokens=80, tools=[weather_tool()], extra=pinned("Let me check." + HERMES_CALL),
                           stream=True, **GREEDY))
    assert "".join(c.text for c in chunks) == "Let me check."
    calls = assemble(chunks)
    assert [name for _, name, _ in calls] == ["get_weather"]
    assert calls[0][2] == msg.tool_calls[0].function.arguments  # streamed as generated: the same arguments
    assert sum(1 for c in chunks if c.choices[0].delta.tool_calls) > 2  # in more than one delta
    assert "<tool_call" not in "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage is not None


def test_auto_call_with_arguments_that_fail_the_schema_is_an_error(engine):
    bad = HERMES_CALL.replace("celsius", "kelvin")
    with pytest.raises(StructuredOutputError) as e:
        engine.chat("smollm2", WEATHER_Q, max_tokens=80, tools=[weather_tool()], extra=pinned(bad), **GREEDY)
    assert "get_weather" in str(e.value) and "kelvin" in str(e.value)


def test_auto_may_answer_in_text(engine):
    r = engine.chat("smollm2", [{"role": "user", "content": "Say hello."}], max_tokens=24, tools=[weather_tool()], **GREEDY)
    assert r.choices[0].message.tool_calls is None and r.text and r.finish_reason in ("stop", "length")


def test_tool_result_turn(model):
    """The OpenAI loop: the model calls, the caller runs the tool and sends back the assistant message (with
    ``content: None``) and a ``tool`` message; the model answers from the result."""
    eng, name = model
    first = eng.chat(name, WEATHER_Q, max_tokens=80, tools=[weather_tool()], tool_choice="required", **GREEDY)
    call = first.choices[0].message.tool_calls[0]
    history = WEATHER_Q + [
        first.choices[0].message.to_dict(),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 31, "sky": "sunny"})},
    ]
    assert history[1]["content"] is None and history[1]["tool_calls"][0]["id"] == call.id
    r = eng.chat(name, history, max_tokens=48, tools=[weather_tool()], tool_choice="none", **GREEDY)
    assert r.choices[0].message.tool_calls is None and r.text
    assert "31" in r.text or "sunny" in r.text.lower()


def test_python_functions_as_tools(engine):
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        """Get the current weather in a city.

        Args:
            city: the city, e.g. Paris
            unit: the temperature unit
        """
        return "sunny"

    from unillm.structured import tool_from_function

    tool = tool_from_function(get_weather)
    fn = tool["function"]
    assert fn["name"] == "get_weather" and fn["description"] == "Get the current weather in a city."
    assert fn["parameters"]["required"] == ["city"]
    assert fn["parameters"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert fn["parameters"]["properties"]["city"]["description"] == "the city, e.g. Paris"
    r = engine.chat("smollm2", WEATHER_Q, max_tokens=80, tools=[get_weather], tool_choice="required", **GREEDY)
    check_call(r.choices[0].message.tool_calls[0], tool)


def assemble(chunks) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of each streamed tool call, its deltas joined by index as OpenAI clients do."""
    calls: dict[int, list[str]] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d["index"], ["", "", ""])
            call[0] = d.get("id") or call[0]
            call[1] = d["function"].get("name") or call[1]
            call[2] += d["function"].get("arguments") or ""
    return [tuple(v) for _, v in sorted(calls.items())]  # type: ignore[misc]


def test_stream_of_a_required_call(model):
    eng, name = model
    full = eng.chat(name, WEATHER_Q, max_tokens=80, tools=[weather_tool()], tool_choice="required", **GREEDY)
    chunks = list(eng.chat(name, WEATHER_Q, max_tokens=80, tools=[weather_tool()], tool_choice="required", stream=True, **GREEDY))
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0]["index"] == 0 and deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "get_weather"
    assert len(deltas) > 2 and all("id" not in d and "name" not in d["function"] for d in deltas[1:])  # arguments as generated
    [(_, name, arguments)] = assemble(chunks)
    assert arguments == full.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(arguments) == json.loads(full.choices[0].message.tool_calls[0].function.arguments)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].finish_reason == "tool_calls" and counts(chunks[-1].usage) == counts(full.usage)
    assert all(c.finish_reason is None for c in chunks[:-1])


# -- messages as OpenAI code sends them --------------------------------------------------------------------


def test_content_parts_and_names_are_accepted(engine):
    plain = engine.chat("smollm2", CITY, max_tokens=16, **GREEDY)
    parts = [CITY[0], {"role": "user", "name": "alice", "content": [
        {"type": "text", "text": "Describe Paris, "}, {"type": "text", "text": "the capital of France."}]}]
    assert engine.chat("smollm2", parts, max_tokens=16, **GREEDY).text == plain.text
    with pytest.raises(InvalidRequestError) as e:
        engine.chat("smollm2", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "'image_url' part" in str(e.value)


# -- one definition of the parameters -------------------------------------------------------------------


def test_parameters_are_defined_once():
    """The CLI's flags, the server's fields and the registry's defaults all come from unillm.params.PARAMS."""
    import subprocess
    import sys

    from unillm.registry import SamplingDefaults
    from unillm.serve.ollama_api import OLLAMA_OPTIONS as _OLLAMA_OPTIONS
    from unillm.serve.openai_api import OPENAI_PARAMS as _OPENAI_PARAMS

    flagged = [p.flags[-1] for p in PARAMS.values() if p.flags]
    for command in ("chat", "batch"):
        out = subprocess.run([sys.executable, "-m", "unillm", command, "--help"], capture_output=True, text=True).stdout
        assert all(flag in out for flag in flagged + ["--schema"]), (command, out)
    assert set(SamplingDefaults.model_fields) == {n for n, p in PARAMS.items() if p.registry_default}
    assert set(_OPENAI_PARAMS) == set(PARAMS) - {"extra"}
    assert set(_OLLAMA_OPTIONS.values()) == {n for n, p in PARAMS.items() if p.ollama}
    from pydantic import ValidationError

    from unillm.registry import ModelSpec

    with pytest.raises(ValidationError) as e:
        ModelSpec.model_validate({"name": "a", "backend": "llamacpp", "source": {"path": "/x"}, "context_window": 8,
                                  "defaults": {"temperature": 9}})
    assert "temperature=9" in str(e.value) or "out of range" in str(e.value)


# -- the CLI and batch jobs ------------------------------------------------------------------------------


def unillm(*args: str, timeout: float = 300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "unillm", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_chat_with_a_schema(tmp_path):
    schema = SCHEMAS["nested"]
    out = unillm("chat", "smollm2", "Describe Paris, the capital of France.", "-s", CITY[0]["content"], "-t", "0",
                 "--seed", "0", "-n", "200", "--schema", json.dumps(schema))
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), schema)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": 5}}}')
    out = unillm("chat", "smollm2", "hi", "--schema", str(bad))
    assert out.returncode == 2 and "not a valid JSON schema" in out.stderr and "Traceback" not in out.stderr
    # A budget too small for the answer: the error, and nothing on stdout (it used to stream partial JSON
    # there, which a script piping stdout into a JSON parser would read).
    out = unillm("chat", "smollm2", "Describe Paris, the capital of France.", "-t", "0", "-n", "5",
                 "--schema", json.dumps(schema))
    assert out.returncode == 2 and "max_tokens" in out.stderr and out.stdout == "", (out.stdout, out.stderr)


def test_batch_job_with_a_schema_retries_what_failed(tmp_path):
    """Each record's parsed object and raw text go to the output; a record that cannot satisfy the schema
    (here: a budget too small for it) is an error record, and --retry-failed redoes it, exactly once."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    cities = ["Paris", "Berlin", "Madrid", "Rome"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"c{i}", "text": c}) + "\n" for i, c in enumerate(cities)))
    out = tmp_path / "out.jsonl"
    base = ["batch", str(src), "-o", str(out), "-m", "smollm2", "--schema", str(tmp_path / "schema.json"),
            "--template", str(tmp_path / "t.txt"), "-t", "0", "--no-progress"]
    (tmp_path / "t.txt").write_text("Give the city and the country of $text as JSON.")
    first = unillm(*base, "-n", "3")
    assert first.returncode == 1, first.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all(r["error"]["type"] == "StructuredOutputError" for r in records)
    assert "max_tokens" in records[0]["error"]["message"]
    second = unillm(*base, "-n", "100", "--retry-failed")
    assert second.returncode == 0, second.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    done = {r["id"]: r for r in records if "error" not in r}
    assert sorted(done) == ["c0", "c1", "c2", "c3"]  # each redone once
    for r in done.values():
        jsonschema.validate(r["parsed"], schema)
        assert json.loads(r["answer"]) == r["parsed"]


# -- logprobs ------------------------------------------------------------------------------------------------


def test_logprobs_on_llamacpp(model):
    """OpenAI's logprobs on the default model (batched) and on the one-sequence path."""
    import math

    eng, name = model
    r = eng.chat(name, CITY, max_tokens=12, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs["content"]
    assert len(content) == r.usage.completion_tokens
    assert "".join(t["token"] for t in content).startswith(r.text[:5])
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 3
        assert math.isclose(t["logprob"], t["top_logprobs"][0]["logprob"], abs_tol=1e-6)  # greedy: the top token
        assert t["top_logprobs"][0]["logprob"] >= t["top_logprobs"][1]["logprob"] >= t["top_logprobs"][2]["logprob"]
    chunks = list(eng.chat(name, CITY, max_tokens=12, logprobs=True, stream=True, **GREEDY))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]
    assert r.to_dict()["choices"][0]["logprobs"]["content"][0]["bytes"] == content[0]["bytes"]


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["call", "auto"])
def test_streamed_call_deltas_join_to_the_final_arguments_at_every_split(mode):
    """Tool-call arguments stream as they are generated; wherever the text is split into pieces, the deltas
    joined by index are the final call's arguments, and no tag or brace that closes the call leaks out."""
    from unillm.structured import structure_of

    tools = [weather_tool()]
    if mode == "call":
        s = structure_of(None, tools, "required")
        text = '{ "name" : "get_weather" , "arguments" : { "city" : "Paris" , "unit" : "celsius" } }'
    else:
        s = structure_of(None, tools, "auto")
        text = "Let me check." + HERMES_CALL
    for cut in range(1, len(text)):
        for pieces in ([text[:cut], text[cut:]], [text[i:i + 1] for i in range(len(text))] if cut == 1 else []):
            if not pieces:
                continue
            shaper = s.streamer()
            content, deltas = "", []
            for piece in pieces:
                content += shaper.feed(piece)
                deltas += shaper.call_deltas()
            rest, last, finish = shaper.end("m", "stop")
            content += rest
            deltas += last or []
            args = "".join(d["function"].get("arguments") or "" for d in deltas)
            msg, _ = s.finish("m", text, "stop")
            assert finish == "tool_calls" and args == msg.tool_calls[0].function.arguments, (cut, pieces[:3])
            assert json.loads(args) == {"city": "Paris", "unit": "celsius"}
            assert [d["function"]["name"] for d in deltas if "name" in d["function"]] == ["get_weather"]
            assert content == ("" if mode == "call" else "Let me check.")
