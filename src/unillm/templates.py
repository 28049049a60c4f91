"""A bound on every chat-template render in the process: time, steps and the size of what one operation
makes. A chat template is code from a file (a GGUF's metadata, a registry entry, a tokenizer config), and
every library renders it in Jinja's sandbox, which forbids unsafe attribute access but not work: nested
``range(100000)`` loops never ended, and the model's worker was stuck with them.

Jinja's sandbox routes every call, attribute and item lookup of a template through its environment's
``call``, ``getattr`` and ``getitem``, and binary operators it intercepts through ``call_binop``.
:func:`install` wraps those methods of the sandbox classes once (as the libraries that render templates
use them: llama-cpp-python, transformers and so vLLM); the wrappers only count while a render runs inside
:func:`bounded` on the same thread, and pass straight through otherwise. Past a limit the render raises
:class:`~unillm.errors.InvalidRequestError` naming it (``UNILLM_TEMPLATE_SECONDS``, ``UNILLM_TEMPLATE_STEPS``,
``UNILLM_TEMPLATE_CHARS``).

Example:
    >>> from jinja2.sandbox import ImmutableSandboxedEnvironment
    >>> install()
    >>> t = ImmutableSandboxedEnvironment().from_string("{% for i in range(3) %}{{ i }}{% endfor %}")
    >>> with bounded("example"):
    ...     t.render()
    '012'
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from .errors import InvalidRequestError
from .limits import limit, over

_state = threading.local()
_installed = False
_lock = threading.Lock()


class _Budget:
    __slots__ = ("what", "deadline", "steps", "max_steps", "max_chars", "seconds")

    def __init__(self, what: str) -> None:
        self.what = what
        self.seconds = limit("template_seconds")
        self.deadline = time.monotonic() + self.seconds
        self.steps = 0
        self.max_steps = limit("template_steps")
        self.max_chars = limit("template_chars")

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.max_steps:
            raise InvalidRequestError(over("template_steps", f"the chat template of {self.what} ran too many steps"))
        if self.steps % 64 == 0 or n > 1:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise InvalidRequestError(over("template_seconds", f"rendering the chat template of {self.what} ran too long"))

    def sized(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)) and len(value) > self.max_chars:
            raise InvalidRequestError(over("template_chars", f"the chat template of {self.what} made a value of length {len(value)}"))
        return value


def _result_size(operator: str, left: Any, right: Any) -> int:
    """The length of what ``left <operator> right`` makes, for repetition and concatenation (else 0)."""
    seq = (str, list, tuple)
    if operator == "*":
        if isinstance(left, seq) and isinstance(right, int):
            return len(left) * right
        if isinstance(right, seq) and isinstance(left, int):
            return len(right) * left
    if operator == "+" and isinstance(left, seq) and isinstance(right, seq):
        return len(left) + len(right)
    return 0


def _budget() -> _Budget | None:
    return getattr(_state, "budget", None)


@contextlib.contextmanager
def bounded(what: str) -> Iterator[None]:
    """Bound the template renders this thread runs inside the block (``what`` names the model in errors)."""
    install()
    outer = _budget()
    _state.budget = _Budget(what)
    try:
        yield
    finally:
        _state.budget = outer


def install() -> None:
    """Wrap the sandbox's hooks once (idempotent; see the module docstring)."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from jinja2 import sandbox

        cls = sandbox.SandboxedEnvironment
        call, getattr_, getitem, binop = cls.call, cls.getattr, cls.getitem, cls.call_binop

        def bounded_call(self: Any, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            b = _budget()
            if b is None:
                return call(self, __context, __obj, *args, **kwargs)
            b.step()
            out = call(self, __context, __obj, *args, **kwargs)
            if isinstance(out, range):  # every item of a loop over it is a step
                b.step(len(out))
            return b.sized(out)

        def bounded_getattr(self: Any, obj: Any, attribute: str) -> Any:
            if (b := _budget()) is not None:
                b.step()
            return getattr_(self, obj, attribute)

        def bounded_getitem(self: Any, obj: Any, argument: Any) -> Any:
            if (b := _budget()) is not None:
                b.step()
            return getitem(self, obj, argument)

        def bounded_binop(self: Any, context: Any, operator: str, left: Any, right: Any) -> Any:
            b = _budget()
            if b is not None and _result_size(operator, left, right) > b.max_chars:  # checked before it is made
                raise InvalidRequestError(over(
                    "template_chars", f"the chat template of {b.what} would make a value of length {_result_size(operator, left, right)}"))
            return binop(self, context, operator, left, right)

        cls.call = bounded_call  # type: ignore[method-assign]
        cls.getattr = bounded_getattr  # type: ignore[method-assign]
        cls.getitem = bounded_getitem  # type: ignore[method-assign]
        cls.call_binop = bounded_binop  # type: ignore[method-assign]
        # String and list repetition and concatenation go through call_binop (so that one expression cannot
        # make gigabytes); the sandbox leaves them unchecked by default.
        cls.intercepted_binops = frozenset(cls.intercepted_binops | {"*", "+"})
        _installed = True
