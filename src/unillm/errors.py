"""Exceptions raised by unillm.

Every error unillm raises derives from :class:`UnillmError`, so one ``except`` catches them all::

    UnillmError
    ├── ConfigError                  a registry file is malformed (names the file and key)
    ├── UnknownModelError            no model of that name or alias (lists the closest names)
    ├── BackendNotInstalledError     the backend's library is missing (names the pip command)
    ├── BackendUnavailableError      a backend service (the Ollama daemon) does not answer
    ├── UnsupportedFeatureError      the backend cannot do what was asked (JSON schema, ...)
    ├── ModelLoadError               the model file or checkpoint could not be loaded
    ├── InvalidRequestError          bad messages or parameter values
    │   └── ContextWindowExceededError   prompt (+ max_tokens) over the model's context window
    ├── GenerationError              the backend failed while generating
    │   ├── StructuredOutputError        the answer does not match the schema or tool (or was cut short)
    │   └── ModelUnloadedError           the model was unloaded (or the engine closed) mid-request
    ├── EngineClosedError            the Engine was used after close() (or in a forked child)
    └── JobError                     a batch job's output cannot be used or kept (locked by another job,
                                     the input itself, removed mid-job, the disk full)

Errors are raised for one request and never poison the engine: after any of them except
:class:`EngineClosedError`, the next request is served normally.

Example:
    >>> from unillm import UnillmError, UnknownModelError
    >>> issubclass(UnknownModelError, UnillmError)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class UnillmError(Exception):
    """Root of every unillm error."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross processes (a Ray replica's error reaches the job's driver): rebuild one from its message
        # and attributes, whatever its class's __init__ takes.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[UnillmError], args: tuple[Any, ...], state: dict[str, Any]) -> UnillmError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ConfigError(UnillmError):
    """A model registry file cannot be used: bad YAML, an unknown key, a bad value."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        where = ", ".join(p for p in (path and f"file {path}", key and f"key {key!r}") if p)
        super().__init__(f"{where}: {message}" if where else message)


class UnknownModelError(UnillmError):
    """No registry entry has this name or alias."""

    def __init__(self, name: str, suggestions: Sequence[str] = ()) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"Unknown model {name!r}.{hint} `unillm models` lists the registry.")


class BackendNotInstalledError(UnillmError):
    """The Python package a backend needs is not installed."""

    def __init__(self, backend: str, package: str, extra: str, model: str | None = None) -> None:
        self.backend = backend
        self.package = package
        self.extra = extra
        self.model = model
        self.install_command = f"pip install 'unillm[{extra}]'"
        for_model = f" (needed by model {model!r})" if model else ""
        super().__init__(
            f"The {backend!r} backend{for_model} needs the package {package!r}, which is not "
            f"installed. Install it with: {self.install_command}"
        )


class BackendUnavailableError(UnillmError):
    """A service that a backend talks to (the Ollama daemon) is down or unreachable."""


class UnsupportedFeatureError(UnillmError):
    """The backend does not support the requested feature."""

    def __init__(self, backend: str, feature: str) -> None:
        self.backend = backend
        self.feature = feature
        super().__init__(f"The {backend!r} backend does not support {feature}.")


class ModelLoadError(UnillmError):
    """The model could not be loaded (missing file, corrupt weights, out of memory...)."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"Could not load model {model!r}: {reason}")


class InvalidRequestError(UnillmError, ValueError):
    """The request itself is wrong: messages, roles, or parameter values."""


class ContextWindowExceededError(InvalidRequestError):
    """The prompt, or the prompt plus the requested max_tokens, does not fit the context window."""

    def __init__(
        self, model: str, prompt_tokens: int, context_window: int, max_tokens: int | None = None,
        *, embedding: bool = False,
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window
        self.max_tokens = max_tokens
        if max_tokens is None:
            detail = f"the prompt has {prompt_tokens} tokens"
        else:
            detail = (
                f"the prompt has {prompt_tokens} tokens and max_tokens={max_tokens} asks for "
                f"{prompt_tokens + max_tokens} in all"
            )
        if embedding:
            detail, advice = f"a text to embed has {prompt_tokens} tokens", "Shorten it, or ask for truncate=True"
        else:
            advice = "Shorten the messages or lower max_tokens"
        super().__init__(
            f"Model {model!r} has a context window of {context_window} tokens, but {detail}. "
            f"{advice}; unillm never truncates silently."
        )


class GenerationError(UnillmError):
    """The backend failed while generating; the engine stays usable."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"Generation with model {model!r} failed: {reason}")


class StructuredOutputError(GenerationError):
    """A JSON answer or tool call that does not satisfy its schema, or that the token budget cut short.

    ``text`` is what the model generated, for inspection; it is never returned as a success.
    """

    def __init__(self, model: str, reason: str, text: str = "") -> None:
        super().__init__(model, reason)
        self.text = text


class ModelUnloadedError(GenerationError):
    """The model was unloaded, or the engine closed, while this request was running: its answer is
    incomplete and is not returned."""

    def __init__(self, model: str) -> None:
        super().__init__(model, "the model was unloaded (or the engine closed) while this request was running; "
                         "its answer is incomplete")


class EngineClosedError(UnillmError):
    """The Engine was used after ``close()``."""


class JobError(UnillmError):
    """A batch job cannot use or keep its output: another job holds it, it is the input, it is not a regular
    file, it was removed or replaced while the job ran, or writing it failed (a full disk). What the job wrote
    before stays, and running the job again resumes it."""
