"""The engine's text side: raw and fill-in-the-middle completions (``Engine.complete``), and the model's own
tokenizer (``tokenize``, ``detokenize``, ``count_tokens``).

:class:`CoreText` holds the async work (on the engine's loop) and is mixed into the engine's core;
:class:`EngineText` holds the public blocking and async methods and is mixed into :class:`~unillm.Engine`.
Prompts become token ids in :mod:`unillm.completions`, on each backend's own tokenizer.

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                      # doctest: +SKIP
    ...     r = engine.complete("smollm2", "def add(a, b):\\n    return", max_tokens=8, temperature=0)
    ...     r.choices[0].text, r.finish_reason
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from typing_extensions import Unpack

from .completions import LegacyLogprobs, Prompt, files_of
from .errors import InvalidRequestError, ModelUnloadedError
from .messages import validate_messages
from .params import ChatParams, Tool
from .types import Completion, CompletionChoice, Message, Timings, Usage

T = TypeVar("T")

if TYPE_CHECKING:
    from collections import Counter

    from ._loop import LoopThread
    from .backends.base import Backend, Generation, Request
    from .registry import ModelSpec


def make_prompt(prompt: Any, suffix: Any, files: Any, echo: bool, params: Mapping[str, Any]) -> Prompt:
    """A completion's prompt checked: text (or token ids), a suffix, other files of the project."""
    ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) or ids):
        raise InvalidRequestError(f"prompt must be a string (or a list of token ids), got {type(prompt).__name__}")
    if suffix is not None and not isinstance(suffix, str):
        raise InvalidRequestError(f"suffix must be a string, got {type(suffix).__name__}")
    made = Prompt(prompt, suffix, files_of(files, "files"))
    if not prompt and not made.fim:
        raise InvalidRequestError("prompt is empty: give the text to continue (or a suffix, for fill-in-the-middle)")
    if echo and (made.fim or ids):
        raise InvalidRequestError("echo applies to a text prompt without a suffix")
    if echo and params.get("logprobs"):
        raise InvalidRequestError("echo with logprobs is not supported by unillm (no log probabilities of the prompt)")
    return made


class CoreText:
    """Completions and tokenizing on the engine's loop (mixed into the engine's core)."""

    if TYPE_CHECKING:
        outcomes: Counter[str]

        async def _prepare(self, model: str, messages: Any, params: dict[str, Any], prompt: Prompt | None = None
                           ) -> tuple[ModelSpec, Backend, Request, float, Any]: ...
        async def generations(self, spec: ModelSpec, backend: Backend, req: Request) -> list[Generation]: ...
        async def serving(self, model: str) -> tuple[ModelSpec, Backend, float, Any]: ...
        def _errors(self, spec: ModelSpec, backend: Backend) -> AbstractContextManager[None]: ...
        def counted(self) -> AbstractContextManager[None]: ...
        def reading(self, spec: ModelSpec, backend: Backend, pieces: Any) -> AbstractAsyncContextManager[Any]: ...

    async def complete(self, model: str, prompt: Prompt, params: dict[str, Any], echo: bool = False) -> Completion:
        spec, backend, req, load_s, fallback = await self._prepare(model, (), params, prompt)
        with self.counted():
            gens = await self.generations(spec, backend, req)
        head = prompt.text if echo and isinstance(prompt.text, str) else ""
        choices = []
        for i, g in enumerate(gens):
            self.outcomes[g.finish_reason] += 1
            lp = LegacyLogprobs.of(g.logprobs, len(head)).to_dict() if g.logprobs is not None else None
            choices.append(CompletionChoice(i, head + g.text, g.finish_reason, lp))
        usage, timings = totals(gens, req, load_s)
        return Completion(
            req.id, spec.name, spec.backend, choices, usage, timings,
            requested_model=fallback.requested if fallback else None,
            fallback_reason=fallback.reason if fallback else None,
        )

    async def open_completion(self, model: str, prompt: Prompt, params: dict[str, Any], echo: bool = False
                              ) -> AsyncGenerator[Completion, None]:
        """Start a streamed completion and wait for its first chunk, so that bad requests fail here."""
        if params.get("n", 1) != 1:
            raise InvalidRequestError("n > 1 is not streamed by unillm: ask without stream, or for one answer")
        spec, backend, req, load_s, fallback = await self._prepare(model, (), params, prompt)
        return await started(self._completion_chunks(spec, backend, req, load_s, fallback, echo))

    async def _completion_chunks(self, spec: ModelSpec, backend: Backend, req: Request, load_s: float, fallback: Any,
                                 echo: bool) -> AsyncGenerator[Completion, None]:
        pieces = backend.stream(req)
        head = req.prompt.text if echo and req.prompt is not None and isinstance(req.prompt.text, str) else ""
        at = 0  # characters sent: the text offsets of logprobs
        async with self.reading(spec, backend, pieces) as tally:
            async for piece in pieces:
                if piece.finish_reason == "cancelled":  # unload or close stopped it while it was being read
                    raise ModelUnloadedError(spec.name)
                text, head = head + piece.text, ""
                if not (text or piece.logprobs or piece.finish_reason):
                    continue
                lp = LegacyLogprobs.of(piece.logprobs, at).to_dict() if piece.logprobs is not None else None
                at += len(text)
                c = Completion(req.id, spec.name, spec.backend, [CompletionChoice(0, text, piece.finish_reason, lp)],
                               requested_model=fallback.requested if fallback else None,
                               fallback_reason=fallback.reason if fallback else None)
                if piece.finish_reason is not None:
                    tally.outcome = piece.finish_reason
                    c.usage = piece.usage
                    c.timings = Timings(load_s, piece.ttft_s, time.perf_counter() - req.started, piece.decode_tokens_per_s)
                yield c

    async def tokenize(self, model: str, text: Any, special: bool, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a string, got {type(text).__name__}")
        spec, backend, _, _ = await self.serving(model)
        with self._errors(spec, backend):
            return await backend.tokenize(text, special, add_bos)

    async def detokenize(self, model: str, ids: Any) -> str:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise InvalidRequestError("tokens must be a list of non-negative integers (token ids)")
        spec, backend, _, _ = await self.serving(model)
        with self._errors(spec, backend):
            return await backend.detokenize(ids)

    async def count_tokens(self, model: str, what: Any, tools: Any = None) -> int:
        if isinstance(what, str):
            if tools:
                raise InvalidRequestError("tools are counted with messages, not with a text")
            return len(await self.tokenize(model, what, False))
        spec, backend, req = await self._messages_request(model, what, tools)
        with self._errors(spec, backend):
            return await backend.chat_tokens(req)

    async def apply_chat_template(self, model: str, messages: Any) -> str:
        spec, backend, req = await self._messages_request(model, messages)
        with self._errors(spec, backend):
            return await backend.chat_prompt(req)

    async def _messages_request(self, model: str, messages: Any, tools: Any = None) -> tuple[ModelSpec, Backend, Request]:
        from .backends.base import Request, new_request_id
        from .params import merge_params

        msgs = validate_messages(messages)
        params = merge_params({}, {"tools": tools} if tools else {})  # the tools' instructions are in the prompt
        spec, backend, _, _ = await self.serving(model)
        return spec, backend, Request(new_request_id(), msgs, params)


class EngineText:
    """``Engine.complete``, ``tokenize``, ``detokenize``, ``count_tokens``, ``apply_chat_template`` and their
    async twins (mixed into Engine)."""

    if TYPE_CHECKING:
        _core: Any  # the engine's core, a CoreText
        _loop: LoopThread

        def _check_open(self) -> None: ...

    @overload
    def complete(self, model: str, prompt: str | list[int], *, suffix: str | None = None,
                 files: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None, echo: bool = False,
                 stream: Literal[False] = False, **params: Unpack[ChatParams]) -> Completion: ...

    @overload
    def complete(self, model: str, prompt: str | list[int], *, suffix: str | None = None,
                 files: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None, echo: bool = False,
                 stream: Literal[True], **params: Unpack[ChatParams]) -> Iterator[Completion]: ...

    def complete(self, model: str, prompt: str | list[int], *, suffix: str | None = None,
                 files: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None, echo: bool = False,
                 stream: bool = False, **params: Unpack[ChatParams]) -> Completion | Iterator[Completion]:
        """Continue ``prompt`` as raw text (no chat template); with ``suffix``, fill in the middle between
        ``prompt`` (the text before the cursor) and ``suffix`` (the text after it) with the model's FIM tokens.

        ``files`` adds other files of the project before the prefix (``[{"filename", "text"}]`` or
        ``{name: text}``), for models with repository-level FIM tokens (Qwen2.5-Coder). ``echo`` puts the prompt
        before the answer's text. The parameters are chat's (``max_tokens``, ``temperature``, ``stop``, ``n``,
        ``logprobs``...). The answer has OpenAI's completion shape: ``r.choices[i].text``, ``finish_reason``
        (``length`` only when ``max_tokens`` or the context window was reached), ``usage``, and with logprobs
        ``choices[i].logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``). A model
        whose files have no FIM tokens needs a registry ``fim:`` block for a suffix.

        Example:
            >>> from unillm import Engine
            >>> with Engine() as engine:                              # doctest: +SKIP
            ...     r = engine.complete("smollm2", "def add(a, b):\\n", suffix="\\nprint(add(1, 2))", max_tokens=16)
        """
        self._check_open()
        p = make_prompt(prompt, suffix, files, echo, params)
        if stream:
            return self._loop.iterate(self._loop.run(self._core.open_completion(model, p, dict(params), echo)))
        return self._loop.run(self._core.complete(model, p, dict(params), echo))

    @overload
    async def acomplete(self, model: str, prompt: str | list[int], *, suffix: str | None = None,
                        files: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None, echo: bool = False,
                        stream: Literal[False] = False, **params: Unpack[ChatParams]) -> Completion: ...

    @overload
    async def acomplete(self, model: str, prompt: str | list[int], *, suffix: str | None = None,
                        files: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None, echo: bool = False,
                        stream: Literal[True], **params: Unpack[ChatParams]) -> AsyncIterator[Completion]: ...

    async def acomplete(self, model: str, prompt: str | list[int], *, suffix: str | None = None,
                        files: Sequence[Mapping[str, str]] | Mapping[str, str] | None = None, echo: bool = False,
                        stream: bool = False, **params: Unpack[ChatParams]) -> Completion | AsyncIterator[Completion]:
        """The async twin of :meth:`complete`; with ``stream=True`` it returns an async iterator."""
        self._check_open()
        p = make_prompt(prompt, suffix, files, echo, params)
        if stream:
            agen = await self._loop.run_async(self._core.open_completion(model, p, dict(params), echo))
            return self._loop.aiterate(agen)
        return await self._loop.run_async(self._core.complete(model, p, dict(params), echo))

    def tokenize(self, model: str, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """The model's token ids of ``text``; ``special=True`` turns control-token texts (``<|im_start|>``) into
        those tokens; ``add_bos`` puts the model's BOS first where its tokenizer adds one. Loads the model (its
        tokenizer is part of it)."""
        self._check_open()
        return self._loop.run(self._core.tokenize(model, text, special, add_bos))

    async def atokenize(self, model: str, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        self._check_open()
        return await self._loop.run_async(self._core.tokenize(model, text, special, add_bos))

    def detokenize(self, model: str, tokens: list[int]) -> str:
        """The text of token ids."""
        self._check_open()
        return self._loop.run(self._core.detokenize(model, tokens))

    async def adetokenize(self, model: str, tokens: list[int]) -> str:
        self._check_open()
        return await self._loop.run_async(self._core.detokenize(model, tokens))

    def count_tokens(self, model: str, what: str | Sequence[Mapping[str, Any] | Message], *,
                     tools: Sequence[Tool] | None = None) -> int:
        """Tokens of a text (as :meth:`tokenize` counts them), or of a list of messages once the model's chat
        template renders them, with ``tools`` if the call will offer some (what a chat call's
        ``usage.prompt_tokens`` will be)."""
        self._check_open()
        return self._loop.run(self._core.count_tokens(model, what, tools))

    async def acount_tokens(self, model: str, what: str | Sequence[Mapping[str, Any] | Message], *,
                            tools: Sequence[Tool] | None = None) -> int:
        self._check_open()
        return await self._loop.run_async(self._core.count_tokens(model, what, tools))

    def apply_chat_template(self, model: str, messages: Sequence[Mapping[str, Any] | Message] | str) -> str:
        """The text the model reads for ``messages``: its chat template rendered, with the assistant's turn
        opened (what a chat call tokenizes)."""
        self._check_open()
        return self._loop.run(self._core.apply_chat_template(model, messages))

    async def aapply_chat_template(self, model: str, messages: Sequence[Mapping[str, Any] | Message] | str) -> str:
        self._check_open()
        return await self._loop.run_async(self._core.apply_chat_template(model, messages))


def totals(gens: Sequence[Generation], req: Request, load_s: float) -> tuple[Usage, Timings]:
    """The usage of a request's answers (the prompt once, every answer's tokens) and the first one's timings."""
    first = gens[0]
    usage = Usage(first.usage.prompt_tokens, sum(g.usage.completion_tokens for g in gens), first.usage.cached_tokens)
    return usage, Timings(load_s, first.ttft_s, time.perf_counter() - req.started, first.decode_tokens_per_s)


async def started(chunks: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """A stream whose first chunk has come (a bad request fails here, not while it is read); closed if not."""
    try:
        first = await chunks.__anext__()
    except BaseException:
        await chunks.aclose()
        raise
    return _prepend(first, chunks)


async def _prepend(first: T, rest: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()
