"""The bounds on what one request may ask of the process, in one place: each has a default, an environment
variable that raises (or lowers) it, and the reason it exists. They make the request classes that used to
crash or freeze the process (a grammar llama.cpp cannot build, a regular expression that backtracks for
minutes, a template that loops for ever) into specific errors, while the next request is served.

Values are read from the environment at each use, so a test or a long-running process can change them.

Example:
    >>> from unillm.limits import LIMITS, limit
    >>> limit("schema_depth")
    64
    >>> LIMITS["stop_count"].env
    'UNILLM_MAX_STOP'
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    default: float
    env: str
    what: str
    #: Counts things (an int); False: seconds (a float).
    integer: bool = True

    def value(self) -> float:
        raw = os.environ.get(self.env)
        if raw is None or raw == "":
            return self.default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{self.env}={raw!r} is not a number ({self.what})") from None
        if value <= 0:
            raise ConfigError(f"{self.env}={raw!r} must be above 0 ({self.what})")
        return value


_ALL = [
    Limit("schema_depth", 64, "UNILLM_MAX_SCHEMA_DEPTH",
          "how deeply a JSON schema (response_format, tool parameters) may nest, objects and lists counted as JSON"),
    Limit("schema_enum", 1000, "UNILLM_MAX_SCHEMA_ENUM",
          "enum/const values in one schema, all enums together (OpenAI's structured outputs allow 1,000)"),
    Limit("grammar_repeat", 256, "UNILLM_MAX_GRAMMAR_REPEAT",
          "the largest minLength/maxLength/minItems/maxItems a grammar spells out; larger bounds are checked "
          "on the answer after generation instead (the converter nests one group per repetition; llama.cpp "
          "overflowed its stack on 20,000)"),
    Limit("grammar_bytes", 256 * 1024, "UNILLM_MAX_GRAMMAR_BYTES",
          "the size of a GBNF grammar (extra.grammar, or the one built from a schema)"),
    Limit("grammar_nesting", 1024, "UNILLM_MAX_GRAMMAR_NESTING",
          "how deeply parentheses may nest in a GBNF grammar (llama.cpp's parser recurses on each)"),
    Limit("regex_seconds", 1.0, "UNILLM_REGEX_TIMEOUT",
          "seconds one schema 'pattern' check of an answer may take (it runs without holding the GIL)", False),
    Limit("stop_count", 64, "UNILLM_MAX_STOP", "stop strings in one request"),
    Limit("stop_chars", 512, "UNILLM_MAX_STOP_CHARS", "characters in one stop string"),
    Limit("template_seconds", 5.0, "UNILLM_TEMPLATE_SECONDS", "seconds one chat-template render may take", False),
    Limit("template_steps", 1_000_000, "UNILLM_TEMPLATE_STEPS",
          "range() items, calls and lookups in one chat-template render"),
    Limit("template_chars", 16 * 2**20, "UNILLM_TEMPLATE_CHARS",
          "characters one string or list operation in a chat template may produce"),
]

#: Every limit by name.
LIMITS: dict[str, Limit] = {lim.name: lim for lim in _ALL}


def limit(name: str) -> int | float:
    """The value in force of a limit (an int where the limit counts things)."""
    lim = LIMITS[name]
    value = lim.value()
    return int(value) if lim.integer else value


def over(name: str, what: str) -> str:
    """The text of an error for something over a limit: what, which limit and its value, how to raise it.

    >>> over("stop_count", "stop has 70 strings")
    "stop has 70 strings: over unillm's limit of 64 (stop strings in one request; set UNILLM_MAX_STOP to raise it)"
    """
    lim = LIMITS[name]
    return f"{what}: over unillm's limit of {limit(name)} ({lim.what}; set {lim.env} to raise it)"
