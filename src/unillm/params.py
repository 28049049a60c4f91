"""A chat request's parameters, defined once: request validation and parameter merging, no I/O.

:class:`ChatParams` is the one definition of what ``Engine.chat`` accepts. Each key carries a :class:`Param`
(in its ``Annotated`` metadata) that says how its value is checked, whether a registry entry may set a
default for it, its command-line flag and its Ollama option name. The engine's signatures (``**params:
Unpack[ChatParams]``), :func:`merge_params`, the registry's ``defaults``, the CLI's flags and ``unillm
serve`` all read :data:`PARAMS`, which is derived from it.

Example:
    >>> from unillm.params import merge_params
    >>> merge_params({"temperature": 0.3}, {"max_tokens": 8}).temperature
    0.3
    >>> sorted(n for n, p in PARAMS.items() if p.registry_default)
    ['frequency_penalty', 'max_tokens', 'presence_penalty', 'seed', 'stop', 'temperature', 'think', 'top_p']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_type_hints

from .errors import ContextWindowExceededError, InvalidRequestError
from .limits import limit, over
from .families import LEVELS
from .structured import Structure, structure_of

from typing_extensions import TypedDict

def _check_number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise InvalidRequestError(f"{name}={value} is out of range {bracket}{lo}, {hi}]")
    return float(value)


def _temperature(name: str, v: Any) -> float:
    return _check_number(name, v, 0.0, 2.0)


def _top_p(name: str, v: Any) -> float:
    return _check_number(name, v, 0.0, 1.0, lo_open=True)


def _max_tokens(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}")
    return v


def _stop(name: str, v: Any) -> list[str]:
    stop = [v] if isinstance(v, str) else v
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError(f"{name} must be a non-empty string or a list of them, got {v!r:.200}")
    if len(stop) > limit("stop_count"):
        raise InvalidRequestError(over("stop_count", f"{name} has {len(stop)} strings"))
    longest = max(stop, key=len)
    if len(longest) > limit("stop_chars"):
        raise InvalidRequestError(over("stop_chars", f"{name} {longest[:40]!r}... has {len(longest)} characters"))
    return list(stop)


def _seed(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequestError(f"{name} must be an integer, got {v!r}")
    if not 0 <= v < 2**32:  # llama.cpp takes 32 bits; a larger seed would be cut silently
        raise InvalidRequestError(f"{name}={v} is out of range [0, {2**32 - 1}]")
    return v


def _penalty(name: str, v: Any) -> float:
    return _check_number(name, v, -2.0, 2.0)


def _n(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16:
        raise InvalidRequestError(f"{name} must be an integer from 1 to 16, got {v!r}")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidRequestError(f"{name} must be true or false, got {v!r}")
    return v


def _top_logprobs(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 20:
        raise InvalidRequestError(f"{name} must be an integer from 0 to 20, got {v!r}")
    return v


def _think(name: str, v: Any) -> bool | str:
    if not (isinstance(v, bool) or v in LEVELS):
        raise InvalidRequestError(f"{name} must be true, false, low, medium or high, got {v!r}")
    return v  # type: ignore[no-any-return]


def true_false_or_level(text: str) -> bool | str:
    """``--think``'s value: true or false (as words), or a level."""
    words: dict[str, bool | str] = {"true": True, "false": False, **{level: level for level in LEVELS}}
    if text.lower() not in words:
        raise ValueError(text)  # argparse names the flag and the value
    return words[text.lower()]


def _any(name: str, v: Any) -> Any:
    return v  # checked as a whole by unillm.structured.structure_of


def _extra(name: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise InvalidRequestError(f"{name} must be a dict of backend options, got {type(v).__name__}")
    return dict(v)


@dataclass(frozen=True, slots=True)
class Param:
    """How one chat parameter is checked, and where it appears besides ``Engine.chat``."""

    check: Callable[[str, Any], Any]
    help: str
    #: A registry entry may set a default for it (``defaults:``).
    registry_default: bool = False
    #: Command-line flags (``unillm chat`` and ``unillm batch``) and the argparse type; none: not a flag.
    flags: tuple[str, ...] = ()
    cli_type: Callable[[str], Any] | None = None
    #: The Ollama ``options`` key that carries it in ``unillm serve``'s Ollama API.
    ollama: str | None = None


#: ``response_format``: ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema",
#: "strict"}}``, ``{"type": "text"}``, or a pydantic model class.
ResponseFormat = Union[Mapping[str, Any], type]
#: A tool: ``{"type": "function", "function": {"name", "description", "parameters"}}`` or a typed Python function.
Tool = Union[Mapping[str, Any], Callable[..., Any]]
ToolChoice = Union[Literal["auto", "none", "required"], Mapping[str, Any]]


class ChatParams(TypedDict, total=False):
    """The parameters of one chat call (every one optional; the model's registry defaults fill the gaps)."""

    temperature: Annotated[float, Param(_temperature, "sampling temperature, 0 = greedy (0-2)", True, ("-t", "--temperature"), float, "temperature")]
    top_p: Annotated[float, Param(_top_p, "nucleus sampling: keep tokens up to this probability mass (0-1]", True, ("--top-p",), float, "top_p")]
    max_tokens: Annotated[int, Param(_max_tokens, "most tokens to generate", True, ("-n", "--max-tokens"), int, "num_predict")]
    stop: Annotated[Union[str, list[str]], Param(_stop, "a string that ends the answer (repeatable)", True, ("--stop",), str, "stop")]
    seed: Annotated[int, Param(_seed, "random seed, for repeatable sampling", True, ("--seed",), int, "seed")]
    presence_penalty: Annotated[float, Param(_penalty, "penalize tokens already present (-2 to 2)", True, ("--presence-penalty",), float, "presence_penalty")]
    frequency_penalty: Annotated[float, Param(_penalty, "penalize tokens by how often they appeared (-2 to 2)", True, ("--frequency-penalty",), float, "frequency_penalty")]
    n: Annotated[int, Param(_n, "how many answers (choices) to generate, each with its own seed (1-16)")]
    logprobs: Annotated[bool, Param(_bool, "return each generated token's log probability (llama.cpp, vLLM)")]
    top_logprobs: Annotated[int, Param(_top_logprobs, "with logprobs: the most likely alternatives per token (0-20)")]
    response_format: Annotated[ResponseFormat, Param(_any, "JSON output: json_object, json_schema or a pydantic class")]
    tools: Annotated[Sequence[Tool], Param(_any, "tools the model may call (OpenAI shape, or typed functions)")]
    tool_choice: Annotated[ToolChoice, Param(_any, "auto | none | required | {'type': 'function', 'function': {'name'}}")]
    think: Annotated[Union[bool, Literal["low", "medium", "high"]], Param(
        _think, "reasoning models: think before answering (true, default) or not (false); the reasoning comes apart "
        "from the answer, as message.reasoning_content", True, ("--think",), true_false_or_level)]
    extra: Annotated[Mapping[str, Any], Param(_extra, "backend-specific options (llama.cpp: top_k, min_p, grammar...)")]


#: Every chat parameter by name, from :class:`ChatParams`.
PARAMS: dict[str, Param] = {
    name: next(m for m in hint.__metadata__ if isinstance(m, Param))
    for name, hint in get_type_hints(ChatParams, include_extras=True).items()
}


@dataclass(slots=True)
class SamplingParams:
    """The resolved parameters of one request. ``max_tokens_given`` tells whether the caller set it."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    think: bool | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    max_tokens_given: bool = False
    #: What the answer must look like (a JSON schema, tool calls); see :mod:`unillm.structured`.
    structure: Structure | None = None


def merge_params(defaults: Mapping[str, Any], call: Mapping[str, Any]) -> SamplingParams:
    """Registry defaults under the call's own parameters, each checked (see :data:`PARAMS`)."""
    unknown = set(call) - set(PARAMS)
    if unknown:
        raise InvalidRequestError(
            f"unknown parameter(s) {sorted(unknown)}; use {', '.join(PARAMS)} "
            "(backend-specific options go in extra={...})"
        )
    merged = {k: v for k, v in defaults.items() if v is not None}
    merged.update({k: v for k, v in call.items() if v is not None})
    checked = {name: PARAMS[name].check(name, value) for name, value in merged.items()}
    structure = structure_of(checked.pop("response_format", None), checked.pop("tools", None), checked.pop("tool_choice", None))
    return SamplingParams(
        **checked, structure=structure, max_tokens_given=call.get("max_tokens") is not None
    )


def fit_max_tokens(model: str, prompt_tokens: int, context_window: int, params: SamplingParams) -> int:
    """The number of tokens this request may generate, or :class:`ContextWindowExceededError`.

    A prompt that does not leave room for one token is refused. An explicit ``max_tokens`` that does not
    fit beside the prompt is refused; a default one is lowered to what fits.
    """
    room = context_window - prompt_tokens
    if room < 1:
        raise ContextWindowExceededError(model, prompt_tokens, context_window)
    if params.max_tokens is None:
        return room
    if params.max_tokens > room:
        if params.max_tokens_given:
            raise ContextWindowExceededError(model, prompt_tokens, context_window, params.max_tokens)
        return room
    return params.max_tokens
