"""Structured output and tool calls, the same on every backend: plain functions, no I/O.

A call's ``response_format``, ``tools`` and ``tool_choice`` become one :class:`Structure`. It tells the
backend what to constrain decoding to (``schema``, compiled by that backend's own machinery: llama.cpp's
JSON-schema-to-GBNF, vLLM's structured outputs, xgrammar for transformers, Ollama's ``format``) and which
tools to render in the prompt, and it turns the generated text back into an OpenAI message: JSON content
checked against the schema (``message.parsed``), or ``tool_calls`` whose arguments are checked against the
tool's parameters. Output that does not satisfy the schema, or that the token budget cut short, raises
:class:`~unillm.errors.StructuredOutputError`; it is never returned as a success.

Modes:

- ``json``: ``response_format`` json_object / json_schema / a pydantic class. Content is JSON.
- ``call``: ``tool_choice`` "required" or a named function. Decoding is constrained to one call,
  ``{"name": ..., "arguments": {...}}``, which becomes ``tool_calls``.
- ``auto``: tools are offered and the model chooses; calls are read from its own format (Hermes/Qwen
  ``<tool_call>{...}</tool_call>``, or an answer that is a single ``{"name", "arguments"}`` object).

Example:
    >>> from unillm.structured import structure_of
    >>> s = structure_of({"type": "json_schema", "json_schema": {"name": "city", "schema": {
    ...     "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}, None, None)
    >>> msg, finish = s.finish("m", '{"name": "Paris"}', "stop")
    >>> msg.parsed, finish
    ({'name': 'Paris'}, 'stop')
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidRequestError, StructuredOutputError
from .limits import limit, over
from .messages import new_call_id
from .types import FunctionCall, Message, ToolCall

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
#: A backend's own reader of tool calls: text -> (content outside the calls, [(name, arguments), ...]).
ToolCallParser = Callable[[str], tuple[str, list[tuple[str, Any]]]]
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
#: The start of a call object as decoding writes it (name first, then arguments), up to its arguments' text.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

#: The Hermes / Qwen2.5 instructions, used for chat templates that do not render ``tools`` themselves.
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _validator(schema: Mapping[str, Any], what: str) -> Any:
    import jsonschema

    check_bounds(schema, what)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequestError(f"{what} is not a valid JSON schema: {exc.message}") from exc
    return _bounded_regex(cls)(schema)


def _problem(validator: Any, value: Any) -> str | None:
    try:
        err = next(iter(sorted(validator.iter_errors(value), key=lambda e: e.path)), None)
    except _PatternTimeout as exc:
        return str(exc)
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{err.message}" + (f" (at {where})" if where else "")


# -- bounds on schemas --------------------------------------------------------------------------------

#: The repetition bounds that a grammar spells out one rule per repetition.
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems")


def check_bounds(schema: Any, what: str) -> None:
    """Refuse a schema (or a tool) that could not be handled safely, before anything recurses into it: nested
    deeper than ``UNILLM_MAX_SCHEMA_DEPTH``, more enum values than ``UNILLM_MAX_SCHEMA_ENUM``, a ``$ref`` that
    is not local (nothing is ever fetched), or text that is not valid Unicode (a lone surrogate). Iterative:
    a deep schema cannot exhaust the stack here."""
    max_depth, max_enum = limit("schema_depth"), limit("schema_enum")
    enums = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _unicode(node, what)
            continue
        if not isinstance(node, (Mapping, list, tuple)):
            continue
        if depth > max_depth:
            raise InvalidRequestError(over("schema_depth", f"{what} nests deeper than {max_depth} levels"))
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                raise InvalidRequestError(f"{what}: $ref {ref[:200]!r} points outside the schema; unillm resolves "
                                          "only references within it ('#/$defs/...') and fetches nothing")
            if isinstance(node.get("enum"), list):
                enums += len(node["enum"])
            if "const" in node:
                enums += 1
            if enums > max_enum:
                raise InvalidRequestError(over("schema_enum", f"{what} has more than {max_enum} enum values"))
            for key, value in node.items():
                if isinstance(key, str):
                    _unicode(key, what)
                stack.append((value, depth + 1))
        else:
            stack.extend((value, depth + 1) for value in node)


def _unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what} has text that is not valid Unicode (a lone surrogate at position {exc.start})") from None


def grammar_form(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a backend constrains decoding to: the schema itself, less repetition bounds (``minLength``,
    ``maxLength``, ``minItems``, ``maxItems``) above ``UNILLM_MAX_GRAMMAR_REPEAT``. Grammar compilers spell a
    bound out one rule per repetition (llama.cpp crashed on ``maxLength: 20000``); a bound left out here is
    still enforced, by the check of the answer against the full schema after generation."""
    cap = limit("grammar_repeat")

    def strip(node: Any) -> Any:
        if isinstance(node, list):
            return [strip(v) for v in node]
        if not isinstance(node, dict):
            return node
        return {k: strip(v) for k, v in node.items()
                if not (k in _REPEAT_KEYS and isinstance(v, int) and not isinstance(v, bool) and v > cap)}

    return strip(schema)  # type: ignore[no-any-return]  # check_bounds has bounded its depth


class _PatternTimeout(Exception):
    pass


def _search(pattern: str, text: str) -> bool:
    """``re.search`` by the ``regex`` module, which releases the GIL while it matches and stops after
    ``UNILLM_REGEX_TIMEOUT`` seconds (a pattern that backtracks catastrophically froze every thread)."""
    import regex

    try:
        return regex.search(pattern, text, timeout=limit("regex_seconds")) is not None
    except TimeoutError:
        raise _PatternTimeout(over("regex_seconds", f"checking the answer against the pattern {pattern[:100]!r} took too long")) from None


def _bounded_regex(cls: Any) -> Any:
    """``cls`` with its regex keywords (pattern, patternProperties, additionalProperties next to
    patternProperties) matched by :func:`_search`."""
    import jsonschema
    from jsonschema.exceptions import ValidationError

    def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Any:
        if validator.is_type(instance, "string") and not _search(patrn, instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    def pattern_properties(validator: Any, props: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        for patrn, subschema in props.items():
            for k, v in instance.items():
                if _search(patrn, k):
                    yield from validator.descend(v, subschema, path=k, schema_path=patrn)

    def additional_properties(validator: Any, ap: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object"):
            return
        patterns = list(schema.get("patternProperties", {}))
        extras = [k for k in instance if k not in schema.get("properties", {}) and not any(_search(p, k) for p in patterns)]
        if validator.is_type(ap, "object"):
            for k in extras:
                yield from validator.descend(instance[k], ap, path=k)
        elif ap is False and extras:
            yield ValidationError(f"Additional properties are not allowed ({', '.join(repr(k) for k in sorted(extras))} unexpected)")

    return jsonschema.validators.extend(cls, {"pattern": pattern, "patternProperties": pattern_properties,
                                              "additionalProperties": additional_properties})


# -- tools --------------------------------------------------------------------------------------------


def tool_from_function(fn: Callable[..., Any]) -> dict[str, Any]:
    """An OpenAI tool dict from a Python function's signature, type hints and docstring (Google style
    ``Args:`` lines describe the parameters), as ollama-python accepts."""
    from pydantic import create_model

    sig = inspect.signature(fn)
    doc = inspect.getdoc(fn) or ""
    summary, _, rest = doc.partition("\n\n")
    arg_docs: dict[str, str] = {}
    for line in rest.splitlines() if "Args:" in doc or "Arguments:" in doc else []:
        m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)", line)
        if m and m.group(1) in sig.parameters:
            arg_docs[m.group(1)] = m.group(2).strip()
    fields: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.annotation is inspect.Parameter.empty:
            raise InvalidRequestError(f"tool {fn.__name__!r}: parameter {name!r} has no type hint")
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[name] = (p.annotation, default)
    try:
        model: Any = create_model(fn.__name__, **fields)
        params: dict[str, Any] = model.model_json_schema()
    except Exception as exc:  # noqa: BLE001 - pydantic cannot describe a type
        raise InvalidRequestError(f"tool {fn.__name__!r}: cannot describe its parameters as JSON schema: {exc}") from exc
    params.pop("title", None)
    for name, prop in params.get("properties", {}).items():
        prop.pop("title", None)
        if name in arg_docs:
            prop["description"] = arg_docs[name]
    return {"type": "function", "function": {"name": fn.__name__, "description": summary.strip(), "parameters": params}}


def _tool(i: int, t: Any) -> tuple[dict[str, Any], Any]:
    """A tool in OpenAI's shape, and the validator of its arguments (which also checks its schema)."""
    if callable(t) and not isinstance(t, Mapping):
        tool = tool_from_function(t)
        fn = tool["function"]
        return tool, _validator(fn["parameters"], f"tools[{i}] ({fn['name']}) parameters")
    if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(t.get("function"), Mapping):
        raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}} or a function")
    fn = t["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise InvalidRequestError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, Mapping):
        raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object")
    validator = _validator(params, f"tools[{i}] ({name}) parameters")
    out = {"name": name, "parameters": dict(params)}
    if fn.get("description"):
        description = str(fn["description"])
        _unicode(description, f"tools[{i}] ({name}) description")
        out["description"] = description
    return {"type": "function", "function": out}, validator


def call_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call of one of ``tools``: ``{"name": ..., "arguments": {...}}``."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


# -- the structure of one request ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Structure:
    """What one request's answer must look like, and how to read it (see the module docstring)."""

    mode: Literal["json", "call", "auto"]
    #: The JSON schema decoding is constrained to (json and call modes).
    schema: dict[str, Any] | None = None
    #: The tools to render in the prompt, in OpenAI's shape.
    tools: tuple[dict[str, Any], ...] = ()
    model_class: type | None = None
    _validators: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def constraint(self) -> dict[str, Any] | None:
        """The schema that decoding is constrained to: :func:`grammar_form` of ``schema`` (what the grammar
        leaves out is checked after generation against ``schema`` itself)."""
        return grammar_form(self.schema) if self.schema is not None else None

    # -- reading the output ----------------------------------------------------------------------------

    def finish(
        self, model: str, text: str, finish_reason: str, parser: ToolCallParser | None = None,
        given: list[tuple[str, Any]] | None = None,
    ) -> tuple[Message, str]:
        """The assistant message for a finished generation, and its finish reason.

        ``parser`` reads tool calls in ``auto`` mode where the backend has its library's own parser (vLLM's
        tool parsers); without one, unillm reads the Hermes ``<tool_call>`` format. ``given`` are calls the
        backend's library has already read (Ollama's daemon): checked against the tools, not parsed again."""
        if finish_reason == "cancelled":
            return Message("assistant", text), finish_reason
        if given and self.mode == "auto":
            return Message("assistant", text or None, tool_calls=[
                self._call(model, {"name": name, "arguments": args}) for name, args in given]), "tool_calls"
        if self.mode == "json":
            return Message("assistant", text, parsed=self._json(model, text, finish_reason)), finish_reason
        if self.mode == "call":
            call = self._json(model, text, finish_reason)
            return Message("assistant", None, tool_calls=[self._call(model, call, written_arguments(text))]), "tool_calls"
        if parser is not None:
            try:
                content, raw = parser(text)
            except ValueError as exc:  # a family's reader found a call it cannot read
                if finish_reason == "length":
                    raise StructuredOutputError(model, "the token budget (max_tokens) ran out inside a tool call; raise max_tokens", text) from exc
                raise StructuredOutputError(model, str(exc), text) from exc
            calls = [self._call(model, {"name": name, "arguments": args}) for name, args in raw]
        if parser is None or (not calls and TOOL_CALL_OPEN in text):  # the parser gave up on a malformed call
            content, calls = self.split_calls(model, text, finish_reason)
        if not calls:
            return Message("assistant", text), finish_reason
        return Message("assistant", content or None, tool_calls=calls), "tool_calls"

    def _json(self, model: str, text: str, finish_reason: str) -> Any:
        if finish_reason == "length":
            raise StructuredOutputError(
                model, "the token budget (max_tokens) ran out before the JSON answer was complete; raise max_tokens", text
            )
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise StructuredOutputError(model, f"the answer is not JSON ({exc})", text) from exc
        if self.mode == "json":
            assert self.schema is not None
            problem = _problem(self._validators["$response"], value)
            if problem:
                raise StructuredOutputError(model, f"the answer does not match the JSON schema: {problem}", text)
            if self.model_class is not None:
                try:
                    return self.model_class.model_validate(value)  # type: ignore[attr-defined]
                except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError
                    raise StructuredOutputError(model, f"the answer does not validate as {self.model_class.__name__}: {exc}", text) from exc
        return value

    def _call(self, model: str, call: Any, written: str | None = None) -> ToolCall:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise StructuredOutputError(model, f"a tool call must be {{'name', 'arguments'}}, got {call!r}", json.dumps(call))
        name = call["name"]
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as exc:
                raise StructuredOutputError(model, f"the arguments of the call of {name!r} are not JSON", args) from exc
        validator = self._validators.get(name)
        if validator is None:
            known = ", ".join(t["function"]["name"] for t in self.tools)
            raise StructuredOutputError(model, f"the model called {name!r}, which is not one of the tools ({known})", json.dumps(call))
        problem = _problem(validator, args)
        if problem:
            raise StructuredOutputError(model, f"the arguments of the call of {name!r} do not match its parameters: {problem}", json.dumps(call))
        # The arguments as the model wrote them (what a stream sends as they are generated), when that text is
        # these arguments; else as JSON.
        if written is None or _loads_or(written) != args:
            written = json.dumps(args, ensure_ascii=False)
        return ToolCall(new_call_id(), FunctionCall(name, written))

    def split_calls(self, model: str, text: str, finish_reason: str) -> tuple[str, list[ToolCall]]:
        """(the text outside tool calls, the calls) of an ``auto`` answer."""
        if TOOL_CALL_OPEN in text:
            if finish_reason == "length" and TOOL_CALL_CLOSE not in text.rsplit(TOOL_CALL_OPEN, 1)[1]:
                raise StructuredOutputError(model, "the token budget (max_tokens) ran out inside a tool call; raise max_tokens", text)
            calls = []
            for body in _CALL_RE.findall(text):
                try:
                    calls.append(self._call(model, json.loads(body), written_arguments(body)))
                except ValueError as exc:
                    raise StructuredOutputError(model, f"a <tool_call> block is not JSON ({exc})", text) from exc
            return _CALL_RE.sub("", text).strip(), calls
        stripped = text.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            try:
                value = json.loads(stripped)
            except ValueError:
                return text, []
            if isinstance(value, dict) and value.get("name") in self._validators and set(value) <= {"name", "arguments", "parameters"}:
                return "", [self._call(model, value)]
        return text, []

    def streamer(self, parser: ToolCallParser | None = None, markers: tuple[str, ...] = (TOOL_CALL_OPEN,),
                 leading: tuple[str, ...] = ("{",)) -> StreamShaper:
        return StreamShaper(self, parser, markers, leading)


class StreamShaper:
    """Turns a stream of generated text into content deltas and tool-call deltas.

    ``json`` streams the JSON text as it comes and checks it at the end. ``call`` streams the call as it is
    generated: its id and name once its arguments begin, then the arguments' text as it grows (OpenAI's
    ``tool_calls`` deltas). ``auto`` streams text until a tool call may be starting, then holds the text back
    and streams each ``<tool_call>`` block as ``call`` does. Everything is checked at the end; calls read by a
    backend's own parser (vLLM's) come whole, at the end.
    """

    def __init__(self, structure: Structure, parser: ToolCallParser | None = None,
                 markers: tuple[str, ...] = (TOOL_CALL_OPEN,), leading: tuple[str, ...] = ("{",)) -> None:
        self.s = structure
        self.parser = parser
        #: Text that may begin a call anywhere, and at the answer's beginning (the model family's format).
        self.markers = markers if TOOL_CALL_OPEN in markers else (*markers, TOOL_CALL_OPEN)
        self.leading = leading
        self.text = ""
        self.sent = 0
        #: The calls streamed so far: their id, and the arguments' text sent.
        self.calls: list[tuple[str, str]] = []
        #: Calls the backend's library read (see :meth:`Structure.finish`), sent whole at the end.
        self.given: list[tuple[str, Any]] = []
        self._incremental = structure.mode == "call" or (structure.mode == "auto" and parser is None)

    def feed(self, piece: str) -> str:
        """The content that can be streamed now (the call deltas that can: :meth:`call_deltas`)."""
        self.text += piece
        if self.s.mode == "call":
            return ""
        if self.s.mode == "auto":
            upto = self._safe_upto()
        else:
            upto = len(self.text)
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out

    def _safe_upto(self) -> int:
        found = [i for m in self.markers if (i := self.text.find(m)) >= 0]
        if found:
            return min(self.sent, *found)
        if self.text.lstrip().startswith(self.leading):
            return self.sent  # perhaps a bare call ({"name", "arguments"}, a list of them): hold back until the end
        # Spaces at the end are held too: before a call they are not content (the content of a call's message
        # is the text outside the calls, stripped).
        upto = len(self.text) - max(partial_tag(self.text, m) for m in self.markers)
        return len(self.text[:upto].rstrip())

    def _regions(self) -> list[str]:
        """The text of each call generated so far (the last one perhaps incomplete)."""
        if self.s.mode == "call":
            return [self.text]
        out = []
        for block in self.text.split(TOOL_CALL_OPEN)[1:]:
            end = block.find(TOOL_CALL_CLOSE)
            out.append(block[:end] if end >= 0 else block[: len(block) - partial_tag(block, TOOL_CALL_CLOSE)])
        return out

    def call_deltas(self) -> list[dict[str, Any]]:
        """Tool-call deltas for what was generated since the last call: a new call's id and name, then its
        arguments' text (all but a last ``}``, which may close the call rather than its arguments)."""
        if not self._incremental:
            return []
        out: list[dict[str, Any]] = []
        for i, region in enumerate(self._regions()):
            parts = call_parts(region)
            if parts is None:
                break
            name, rest = parts
            if i == len(self.calls):
                self.calls.append((new_call_id(), ""))
                out.append({"index": i, "id": self.calls[i][0], "type": "function", "function": {"name": name, "arguments": ""}})
            call_id, sent = self.calls[i]
            args = _arguments_so_far(rest)
            if len(args) > len(sent) and args.startswith(sent):
                out.append({"index": i, "function": {"arguments": args[len(sent):]}})
                self.calls[i] = (call_id, args)
        return out

    def end(self, model: str, finish_reason: str) -> tuple[str, list[dict[str, Any]] | None, str]:
        """(content not yet streamed, tool-call deltas not yet sent or None, finish reason) at the end."""
        msg, finish = self.s.finish(model, self.text, finish_reason, self.parser, self.given or None)
        if not msg.tool_calls:
            return self.text[self.sent :], None, finish
        rest = (msg.content or "")[len(self.text[: self.sent].lstrip()) :] if self.s.mode == "auto" else ""
        deltas = []
        for i, tc in enumerate(msg.tool_calls):
            if i >= len(self.calls):
                deltas.append(dict(index=i, **tc.to_dict()))
                continue
            sent = self.calls[i][1]
            if not tc.function.arguments.startswith(sent):  # what was streamed is not what the call holds
                raise StructuredOutputError(model, f"the streamed arguments of the call of {tc.function.name!r} are not its arguments",
                                            self.text)
            if len(tc.function.arguments) > len(sent):
                deltas.append({"index": i, "function": {"arguments": tc.function.arguments[len(sent):]}})
        return rest, deltas, finish


def call_parts(text: str) -> tuple[str, str] | None:
    """(the name, the text after ``"arguments":``) of a call object's text, complete or not; None until its
    arguments begin."""
    m = _CALL_HEAD.match(text)
    if m is None:
        return None
    try:
        return json.loads(f'"{m.group(1)}"'), text[m.end():]
    except ValueError:
        return None


def written_arguments(call_text: str) -> str | None:
    """The arguments' text of a call object as the model wrote it (None: not written name first)."""
    parts = call_parts(call_text)
    return _arguments_so_far(parts[1]) if parts is not None else None


def _arguments_so_far(rest: str) -> str:
    """The arguments' text in ``rest`` (what follows ``"arguments":``), less a last ``}`` and the spaces around
    it: that brace may close the call object (at the end it does)."""
    s = rest.rstrip()
    return (s[:-1] if s.endswith("}") else s).rstrip()


def partial_tag(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _loads_or(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


_NOT_JSON = object()


def response_schema(response_format: Any) -> tuple[dict[str, Any] | None, type | None]:
    """(the JSON schema the answer must match, the pydantic class to parse it into) of a response_format."""
    if response_format is None:
        return None, None
    if isinstance(response_format, type):
        if not hasattr(response_format, "model_json_schema"):
            raise InvalidRequestError(f"response_format must be a dict or a pydantic model class, got {response_format.__name__}")
        return response_format.model_json_schema(), response_format
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError(f"response_format must be a dict or a pydantic model class, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        schema = response_format.get("schema")  # llama-cpp-python's and vLLM's extension
        return (dict(schema) if isinstance(schema, Mapping) else {"type": "object"}), None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise InvalidRequestError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return dict(spec["schema"]), None
    raise InvalidRequestError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def structure_of(response_format: Any, tools: Any, tool_choice: Any) -> Structure | None:
    """The :class:`Structure` of a call's ``response_format``, ``tools`` and ``tool_choice`` (None: free text)."""
    schema, model_class = response_schema(response_format)
    if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)):
        raise InvalidRequestError("tools must be a list of tools")
    parsed = [_tool(i, t) for i, t in enumerate(tools or [])]
    tool_list = [tool for tool, _ in parsed]
    names = [t["function"]["name"] for t in tool_list]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"tools have duplicate names: {names}")
    choice = tool_choice if tool_choice is not None else ("auto" if tool_list else "none")
    if isinstance(choice, Mapping):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name not in names:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not one of the tools {names}")
        chosen = [t for t in tool_list if t["function"]["name"] == name]
    elif choice in ("auto", "none", "required"):
        chosen = tool_list
        if choice != "none" and not tool_list:
            raise InvalidRequestError(f"tool_choice {choice!r} needs tools")
    else:
        raise InvalidRequestError(f"tool_choice must be auto, none, required or {{'type': 'function', 'function': {{'name'}}}}, got {choice!r}")
    validators = {tool["function"]["name"]: validator for tool, validator in parsed}
    if choice == "none" or not tool_list:
        if schema is None:
            return None
        validators["$response"] = _validator(schema, "response_format's schema")
        return Structure("json", schema, (), model_class, validators)
    if schema is not None:
        raise InvalidRequestError("response_format and tools together: unillm constrains one or the other; "
                                  "use tool_choice 'none' for a JSON answer, or drop response_format")
    if choice == "auto":
        return Structure("auto", None, tuple(tool_list), None, validators)
    return Structure("call", call_schema(chosen), tuple(tool_list), None, validators)


def template_dicts(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]], template: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and tools) for a chat template.

    A template that renders ``tools`` itself (Qwen2.5, Llama 3.1, Hermes...) gets them, with tool calls'
    arguments as objects as those templates expect. One that does not (SmolLM2) gets the Hermes
    instructions in its system message, earlier calls as ``<tool_call>`` text and tool results as
    ``<tool_response>`` user turns, the format the model is then asked to answer in.
    """
    native = template is not None and "tools" in template
    has_tools_history = any(m.tool_calls or m.role == "tool" for m in messages)
    out: list[dict[str, Any]] = []
    for m in messages:
        if native or not (tools or has_tools_history):
            d: dict[str, Any] = {"role": m.role, "content": m.content or ""}
            if m.tool_calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": loads_arguments(c.function.arguments)}}
                    for c in m.tool_calls
                ]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
            if m.reasoning_content:  # the template decides whether earlier reasoning stays (Qwen3 keeps the latest)
                d["reasoning_content"] = m.reasoning_content
            out.append(d)
        elif m.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.content or ''}\n</tool_response>"})
        elif m.tool_calls:
            calls = "\n".join(
                f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}\n{TOOL_CALL_CLOSE}'
                for c in m.tool_calls
            )
            out.append({"role": "assistant", "content": ((m.content or "") + "\n" + calls).strip()})
        else:
            out.append({"role": m.role, "content": m.content or ""})
    if native:
        return out, [dict(t) for t in tools] or None
    if tools:
        block = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def loads_arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
