"""Model families as data: how a family's chat template takes tools, how its answers mark tool calls, and how
it marks reasoning. Plain functions, no I/O.

A registry entry names its family (``chat_format: qwen2.5``); ``auto`` (the default) reads it from the
chat template (:func:`detect`). The engine reads every answer through its family: reasoning first
(:class:`Reasoning`: ``<think>...</think>`` becomes ``reasoning_content``), then tool calls in the family's
own format (:func:`read_llama3`, :func:`read_mistral`, :func:`read_deepseek`; Hermes ``<tool_call>`` blocks
are read by :mod:`unillm.structured`). On vLLM the family also names vLLM's own tool parser.

======== ================================ =========================================== ===========
family   tools in the prompt              tool calls in the answer                    reasoning
======== ================================ =========================================== ===========
qwen2.5  the template's ``<tools>`` block ``<tool_call>{"name", "arguments"}</tool_call>`` none
llama3.1 the template's JSON list         ``{"name", "parameters"}`` (``;`` between,  none
                                          ``<|python_tag|>`` before)
mistral  ``[AVAILABLE_TOOLS]``            ``[TOOL_CALLS][{"name", "arguments"}, ...]`` none
qwen3    the template's ``<tools>`` block as qwen2.5                                  ``<think>``
deepseek-r1 unillm's Hermes instructions  DeepSeek's ``<｜tool▁call▁begin｜>`` blocks, or ``<think>``,
                                          as qwen2.5                                  opened by the prompt
plain    unillm's Hermes instructions     as qwen2.5                                  none
======== ================================ =========================================== ===========

Example:
    >>> r = Reasoning(FAMILIES["qwen3"])
    >>> [r.feed(p) for p in ("<thi", "nk>\\nIt is 4.\\n</th", "ink>\\n\\nFour.")], r.end()
    ([('', ''), ('It is 4.', ''), ('', 'Four.')], ('', ''))
    >>> read_llama3('{"name": "add", "parameters": {"a": 1}}')
    ('', [('add', {'a': 1})])
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidRequestError
from .structured import TOOL_CALL_OPEN, ToolCallParser, partial_tag

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
#: ``think`` levels, as Ollama's ``think`` and OpenAI's ``reasoning_effort`` name them.
LEVELS = ("low", "medium", "high")
#: A request's ``think``: None (the family's default), True, False or a level.
Think = bool | str | None


def read_llama3(text: str) -> tuple[str, list[tuple[str, Any]]]:
    """Llama 3.1/3.2 calls: an answer that is ``{"name": ..., "parameters": {...}}`` (several joined by ``;``),
    perhaps after ``<|python_tag|>``. An answer that is other JSON is content. Raises ValueError for a call
    that is not JSON."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith('{"name"') and not re.match(r'\{\s*"name"\s*:', body):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    at = 0
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except ValueError as exc:
            raise ValueError(f"a Llama 3 tool call is not JSON ({exc})") from None
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
            return text, []
        calls.append((value["name"], value.get("parameters", value.get("arguments", {}))))
        at = end
        while at < len(body) and body[at] in " \t\n;":
            at += 1
    return "", calls


def read_mistral(text: str) -> tuple[str, list[tuple[str, Any]]]:
    """Mistral calls: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (v3), or
    ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11); the marker may be gone where the detokenizer drops
    control tokens, leaving a list of calls. Content before the marker is kept."""
    head, marker, rest = text.partition("[TOOL_CALLS]")
    if not marker:
        head, rest = "", text
        if not re.match(r'\s*\[\s*\{\s*"name"\s*:', text):
            return text, []
    rest = rest.strip()
    if rest.startswith("["):
        try:
            value, _ = json.JSONDecoder().raw_decode(rest)
        except ValueError as exc:
            raise ValueError(f"a Mistral tool-call list is not JSON ({exc})") from None
        if not isinstance(value, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in value):
            raise ValueError("a Mistral tool-call list must hold {'name', 'arguments'} objects")
        return head.strip(), [(c["name"], c.get("arguments", {})) for c in value]
    calls = []
    for part in rest.split("[TOOL_CALLS]"):
        name, sep, args = part.partition("[ARGS]")
        if not sep:
            raise ValueError("a Mistral tool call has no [ARGS]")
        try:
            calls.append((name.strip(), json.loads(args)))
        except ValueError as exc:
            raise ValueError(f"the arguments of a Mistral tool call are not JSON ({exc})") from None
    return head.strip(), calls


_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>\s*\w*\s*<｜tool▁sep｜>\s*(.*?)\n```(?:json)?\n(.*?)\n```\s*<｜tool▁call▁end｜>", re.DOTALL)
_DEEPSEEK_OPEN = "<｜tool▁calls▁begin｜>"


def read_deepseek(text: str) -> tuple[str, list[tuple[str, Any]]]:
    """DeepSeek-R1's calls: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` then the
    arguments in a json fence, then ``<｜tool▁call▁end｜>``; none: the Hermes reader's turn."""
    head, marker, rest = text.partition(_DEEPSEEK_OPEN)
    if not marker:
        return text, []
    found = _DEEPSEEK_CALL.findall(rest)
    if not found:
        raise ValueError("a DeepSeek tool-call block has no complete call")
    try:
        return head.strip(), [(name.strip(), json.loads(args)) for name, args in found]
    except ValueError as exc:
        raise ValueError(f"the arguments of a DeepSeek tool call are not JSON ({exc})") from None


@dataclass(frozen=True, slots=True)
class Family:
    """How one family of models talks (see the module docstring's table)."""

    name: str
    #: Models it covers, for the README and ``unillm models``.
    models: str
    #: The reader of tool calls in its own format; None: Hermes ``<tool_call>`` blocks (unillm's own reader).
    read_calls: ToolCallParser | None = None
    #: Text that begins a call anywhere in an answer, and at its very beginning (a stream holds it back).
    markers: tuple[str, ...] = (TOOL_CALL_OPEN,)
    leading: tuple[str, ...] = ("{",)
    #: It writes its reasoning in ``<think>...</think>`` before the answer.
    thinks: bool = False
    #: The prompt opens the ``<think>`` block (the model's first token is reasoning).
    prompt_opens: bool = False
    #: Tool-call ids its template accepts: any, or 9 letters and digits (Mistral's templates raise otherwise).
    call_ids: Literal["any", "alnum9"] = "any"
    #: vLLM's tool parser for it (reasoning on vLLM is split by :class:`Reasoning`, as everywhere).
    vllm_tool_parser: str = "hermes"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2.5", "Qwen2.5, Qwen2.5-Coder, Hermes 2/3"),
    Family("llama3.1", "Llama 3.1, 3.2, 3.3", read_llama3, ("<|python_tag|>",), ("{",), vllm_tool_parser="llama3_json"),
    Family("mistral", "Mistral 7B v0.3, Mistral-Nemo, Mistral Small", read_mistral, ("[TOOL_CALLS]",), ("[",),
           call_ids="alnum9", vllm_tool_parser="mistral"),
    Family("qwen3", "Qwen3, QwQ", thinks=True),
    Family("deepseek-r1", "DeepSeek-R1 and its Qwen and Llama distills", read_deepseek, (_DEEPSEEK_OPEN, TOOL_CALL_OPEN),
           thinks=True, prompt_opens=True, vllm_tool_parser="deepseek_v3"),
    Family("plain", "templates that render no tools (SmolLM2, Llama 2 chat, Gemma)"),
)}


def detect(template: str | None) -> Family:
    """The family a chat template belongs to, by the markers it writes (plain when none is known)."""
    t = template or ""
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return FAMILIES["mistral"]
    if "<｜Assistant｜>" in t or "tool▁calls▁begin" in t:
        return FAMILIES["deepseek-r1"]
    if THINK_OPEN in t or THINK_CLOSE in t:
        return FAMILIES["qwen3"]
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and '"parameters"' in t):
        return FAMILIES["llama3.1"]
    if TOOL_CALL_OPEN in t:
        return FAMILIES["qwen2.5"]
    return FAMILIES["plain"]


def family_of(chat_format: str, template: str | None) -> Family:
    """A registry entry's family: the one it names, else the one its template shows."""
    return detect(template) if chat_format == "auto" else FAMILIES[chat_format]


def check_think(family: Family, think: Think, model: str) -> None:
    """Refuse a ``think`` the family cannot honour (it does not reason, or it has no levels)."""
    if think in LEVELS:
        raise InvalidRequestError(f"think={think!r}: model {model!r} (chat_format {family.name}) has no reasoning levels; "
                                  "use think=true or false")
    if think is True and not family.thinks:
        raise InvalidRequestError(f"think=true: model {model!r} (chat_format {family.name}) does not reason; set its "
                                  "registry chat_format if it is a reasoning model (qwen3, deepseek-r1)")


def think_of_effort(effort: Any) -> Think:
    """OpenAI's ``reasoning_effort`` (and the Responses API's ``reasoning.effort``) as ``think``: ``none`` and
    ``minimal`` are false; a level stays that level (refused later by families without levels)."""
    return False if effort in ("none", "minimal") else effort  # type: ignore[no-any-return]


def thinking(family: Family, think: Think) -> bool:
    """Whether this answer will begin with reasoning."""
    return family.thinks and think is not False


def template_kwargs(family: Family, think: Think, template: str | None) -> tuple[dict[str, Any], str]:
    """(variables for the chat template, text to put after its generation prompt) for ``think``. Templates with
    a switch get ``enable_thinking``; without one, thinking off is an empty ``<think>`` block after the prompt
    (what those switches write)."""
    if not family.thinks:
        return {}, ""
    on = think is not False
    if template is not None and "enable_thinking" in template:
        return {"enable_thinking": on}, ""
    if on:
        return {}, ""
    return {}, f"{THINK_CLOSE}\n\n" if family.prompt_opens else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


def call_id(family: Family, given: str) -> str:
    """A tool call's id in the form the family's template accepts (the same id gives the same answer, so a call
    and its result still match)."""
    if family.call_ids == "any" or (len(given) == 9 and given.isalnum()):
        return given
    return hashlib.sha256(given.encode()).hexdigest()[:9]


def reasoning_grammar(family: Family, gbnf: str) -> str:
    """A GBNF grammar of the answer ``gbnf`` after a reasoning block (its text has no ``<``), for a family
    whose answers begin with reasoning: the JSON comes after the model has thought."""
    body = re.sub(r"^root\s*::=", "unillm-answer ::=", gbnf, count=1, flags=re.MULTILINE)
    head = "" if family.prompt_opens else '"<think>" '
    return f'root ::= unillm-think unillm-answer\nunillm-think ::= {head}[^<]* "</think>" [ \\t\\n]*\n{body}'


class Reasoning:
    """Splits an answer, as its text arrives, into reasoning and content: ``feed`` and ``end`` return
    ``(reasoning, content)`` deltas. Reasoning is the text inside ``<think>`` with the spaces around it
    trimmed; content begins at the first character after ``</think>`` that is not a space. An answer that
    does not think (``on`` false, or a model that opens no block where the prompt does not) is all content."""

    def __init__(self, family: Family, on: bool = True) -> None:
        self.state = ("reasoning" if family.prompt_opens else "start") if on and family.thinks else "content"
        self.held = ""  # text not yet placed
        self.content_started = False
        self.reasoning_started = False

    def feed(self, piece: str) -> tuple[str, str]:
        self.held += piece
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                s = self.held.lstrip()
                if s.startswith(THINK_OPEN):
                    self.held, self.state = s[len(THINK_OPEN):], "reasoning"
                    continue
                if THINK_OPEN.startswith(s):  # perhaps still the tag
                    return reasoning, content
                self.state = "content"
                continue
            if self.state == "reasoning":
                if not self.reasoning_started:
                    s = self.held.lstrip()
                    if s.startswith(THINK_OPEN):  # a model that opens the block the prompt opened
                        s = s[len(THINK_OPEN):].lstrip()
                    elif THINK_OPEN.startswith(s):
                        return reasoning, content
                    self.held = s
                    if not s:
                        return reasoning, content
                    self.reasoning_started = True
                at = self.held.find(THINK_CLOSE)
                if at >= 0:
                    reasoning += self.held[:at].rstrip()
                    self.held, self.state = self.held[at + len(THINK_CLOSE):], "content"
                    continue
                keep = partial_tag(self.held, THINK_CLOSE)
                upto = len(self.held) - keep
                text = self.held[:upto]
                trimmed = text.rstrip()  # spaces before the close stay held: they may end the reasoning
                reasoning += trimmed
                self.held = text[len(trimmed):] + self.held[upto:]
                return reasoning, content
            if not self.content_started:
                self.held = self.held.lstrip()
                if not self.held:
                    return reasoning, content
                self.content_started = True
            content += self.held
            self.held = ""
            return reasoning, content

    def end(self) -> tuple[str, str]:
        """What is still held: a reasoning block never closed is reasoning; text that might have opened one
        is content."""
        rest, self.held = self.held, ""
        if self.state == "reasoning":
            return rest.strip() if not self.reasoning_started else rest.rstrip(), ""
        return "", rest.lstrip() if not self.content_started else rest

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of a whole answer."""
        r1, c1 = self.feed(text)
        r2, c2 = self.end()
        return r1 + r2, c1 + c2


def split_reasoning(family: Family, on: bool, text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer."""
    if not (on and family.thinks):
        return None, text
    reasoning, content = Reasoning(family).split(text)
    return reasoning, content


def family_check(value: Any) -> str:
    """A registry ``chat_format`` value checked."""
    if value != "auto" and value not in FAMILIES:
        raise ValueError(f"chat_format {value!r} is not one of auto, {', '.join(FAMILIES)}")
    return str(value)
