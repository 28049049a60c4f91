"""The pure logic that every request goes through, without a model: parameter merging and checking, message
shapes, the wire APIs' conversions, schema bounds, reading answers and streamed tool calls, job records.
The same paths run end to end against real models in the other modules; here each rule is pinned alone."""

from __future__ import annotations

import json

import pytest

from test_structured import weather_tool
from unillm.errors import ContextWindowExceededError, InvalidRequestError, StructuredOutputError
from unillm.messages import from_ollama_messages, validate_messages
from unillm.params import PARAMS, fit_max_tokens, merge_params
from unillm.structured import Structure, check_bounds, structure_of

pytestmark = pytest.mark.unit

pytest.importorskip("starlette", reason="the wire APIs need unillm[serve]")
from unillm.serve.ollama_api import ollama_params  # noqa: E402
from unillm.serve.openai_api import openai_params  # noqa: E402

TOOLS = [weather_tool()]


# -- parameters ------------------------------------------------------------------------------------------


def test_call_parameters_win_over_registry_defaults_and_none_is_unset():
    p = merge_params({"temperature": 0.2, "max_tokens": 64}, {"temperature": 0.9, "max_tokens": None})
    assert (p.temperature, p.max_tokens, p.max_tokens_given) == (0.9, 64, False)
    assert merge_params({}, {"max_tokens": 8}).max_tokens_given


@pytest.mark.parametrize(("call", "fragment"), [
    ({"temprature": 0.5}, "temprature"), ({"temperature": 3.5}, "temperature"), ({"top_p": "high"}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": True}, "n"),
])
def test_a_bad_parameter_is_refused_by_name(call, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        merge_params({}, call)


def test_max_tokens_fits_the_context_window_or_is_refused():
    default = merge_params({"max_tokens": 500}, {})
    assert fit_max_tokens("m", 100, 512, default) == 412  # a default is lowered to what fits
    with pytest.raises(ContextWindowExceededError) as e:
        fit_max_tokens("m", 100, 512, merge_params({}, {"max_tokens": 500}))  # an explicit one is not
    assert e.value.max_tokens == 500 and e.value.context_window == 512
    with pytest.raises(ContextWindowExceededError):
        fit_max_tokens("m", 512, 512, merge_params({}, {}))


# -- messages --------------------------------------------------------------------------------------------


def test_openai_shapes_parse_into_messages():
    msgs = validate_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ])
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[1].content == "Weather in Paris?"
    assert json.loads(msgs[2].tool_calls[0].function.arguments) == {"city": "Paris"}  # an object becomes JSON text
    assert validate_messages("hi")[0].role == "user"


@pytest.mark.parametrize(("messages", "fragment"), [
    ([], "empty"), ([{"role": "robot", "content": "x"}], "robot"), ([{"role": "user"}], "content"),
    ([{"role": "user", "content": "x", "extra": 1}], "unknown keys"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "image_url"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
    ([{"role": "user", "content": "\ud800"}], "Unicode"),
])
def test_bad_messages_are_refused_with_their_index_or_key(messages, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        validate_messages(messages)


def test_ollama_messages_name_their_tool_and_refuse_images():
    assert from_ollama_messages([{"role": "tool", "tool_name": "add", "content": "3", "thinking": "..."}]) == [
        {"role": "tool", "content": "3", "name": "add"}]
    with pytest.raises(InvalidRequestError, match=r"messages\[0\].images"):
        from_ollama_messages([{"role": "user", "content": "x", "images": ["aGk="]}])


# -- the wire APIs' conversions --------------------------------------------------------------------------


def test_ollama_options_map_to_parameters_and_speed_options_are_dropped():
    p = ollama_params({"options": {"num_predict": -1, "temperature": 0, "num_thread": 4, "num_ctx": 8192,
                                   "mirostat": 2, "top_k": 5}, "format": {"type": "object"}})
    assert "max_tokens" not in p and p["temperature"] == 0  # -1: until the context is full
    assert p["extra"] == {"mirostat_mode": 2, "top_k": 5}
    assert p["response_format"]["json_schema"]["schema"] == {"type": "object"}
    with pytest.raises(InvalidRequestError, match="format"):
        ollama_params({"format": "yaml"})


def test_openai_fields_are_honoured_or_refused_by_name():
    p = openai_params({"model": "m", "messages": [], "max_completion_tokens": 9, "user": "u", "logit_bias": {}})
    assert p == {"max_tokens": 9}
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        openai_params({"logit_bias": {"50256": -100}})
    with pytest.raises(InvalidRequestError, match="audio"):
        openai_params({"audio": {"voice": "x"}})
    assert set(PARAMS) - {"extra"} <= set(openai_params.__globals__["OPENAI_PARAMS"])


# -- schemas and answers ---------------------------------------------------------------------------------


def test_schema_bounds_are_checked_without_recursion(monkeypatch):
    deep: dict = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_SCHEMA_DEPTH"):
        check_bounds(deep, "response_format's schema")
    with pytest.raises(InvalidRequestError, match="outside the schema"):
        check_bounds({"$ref": "https://example.com/s.json"}, "schema")
    monkeypatch.setenv("UNILLM_MAX_SCHEMA_ENUM", "3")
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_SCHEMA_ENUM"):
        check_bounds({"enum": [1, 2, 3, 4]}, "schema")


def test_a_json_answer_cut_by_max_tokens_is_an_error_not_a_success():
    s = structure_of({"type": "json_object"}, None, None)
    assert s is not None and s.mode == "json"
    message, finish = s.finish("m", '{"a": 1}', "stop")
    assert message.parsed == {"a": 1} and finish == "stop"
    with pytest.raises(StructuredOutputError, match="max_tokens"):
        s.finish("m", '{"a": ', "length")


def test_calls_read_by_the_backend_are_checked_against_the_tools():
    s = structure_of(None, TOOLS, "auto")
    assert isinstance(s, Structure) and s.mode == "auto"
    paris = {"city": "Paris", "unit": "celsius"}
    message, finish = s.finish("m", "", "stop", given=[("get_weather", paris)])
    assert finish == "tool_calls" and json.loads(message.tool_calls[0].function.arguments) == paris
    assert message.tool_calls[0].id.startswith("call_")
    with pytest.raises(StructuredOutputError, match="not one of the tools"):
        s.finish("m", "", "stop", given=[("get_time", {})])
    with pytest.raises(StructuredOutputError, match="'unit' is a required property"):
        s.finish("m", "", "stop", given=[("get_weather", {"city": "Paris"})])


def test_streamed_calls_from_the_backend_leave_as_one_whole_delta():
    shaper = structure_of(None, TOOLS, "auto").streamer()
    assert shaper.feed("") == "" and shaper.call_deltas() == []
    shaper.given.append(("get_weather", {"city": "Paris", "unit": "celsius"}))
    rest, deltas, finish = shaper.end("m", "stop")
    assert finish == "tool_calls" and rest == "" and len(deltas) == 1
    assert deltas[0]["function"]["name"] == "get_weather"
    assert json.loads(deltas[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_hermes_text_streams_as_content_then_call_deltas():
    shaper = structure_of(None, TOOLS, "auto").streamer()
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    shown = "".join(shaper.feed(ch) for ch in text)
    assert shown.strip() == "Let me check."
    deltas = shaper.call_deltas()
    assert deltas[0]["function"]["name"] == "get_weather"
    rest, more, finish = shaper.end("m", "stop")
    streamed = "".join(d["function"].get("arguments", "") for d in deltas + (more or []))
    assert finish == "tool_calls" and json.loads(streamed) == {"city": "Paris", "unit": "celsius"}


# -- job records -----------------------------------------------------------------------------------------


def test_job_ids_are_told_apart_by_their_json_value():
    from unillm.jobs import id_key, read_records

    assert id_key(1) != id_key("1") and id_key(None) != id_key("None")
    rows = read_records([b'{"id": 1, "text": "a"}', b"", b"not json", b'{"text": "no id"}', b"\xff"])
    assert [(n, problem is None) for n, _, problem in rows] == [(1, True), (3, False), (4, False), (5, False)]
