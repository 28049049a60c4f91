"""The backend interface: ``load``, ``generate``, ``stream``, ``aclose``, and what it supports.

A backend serves one registry entry. Every method runs on the engine's own event loop; blocking
libraries do their work on a worker thread. Optional features a backend lacks raise
:class:`~unillm.errors.UnsupportedFeatureError`.

Example:
    >>> from unillm.backends.base import Capabilities
    >>> Capabilities(streaming=True).json_schema
    False
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..completions import FimTokens, Prompt, TokenizerVocab, family_tokens, fim_tokens, prompt_ids, tokens_of
from ..errors import ModelUnloadedError, UnillmError, UnsupportedFeatureError
from ..families import Family, call_id, family_of, template_kwargs
from ..params import SamplingParams
from ..registry import ModelSpec
from ..structured import Structure, ToolCallParser, template_dicts
from ..templates import bounded
from ..types import Message, Usage

_ids = itertools.count(1)


def new_request_id(kind: str = "chatcmpl") -> str:
    return f"{kind}-{time.time_ns():x}{next(_ids):04x}"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the engine refuses a request that asks for more, before the backend sees it."""

    streaming: bool = True
    json_schema: bool = False  # response_format with a JSON schema or json_object
    tools: bool = False
    embeddings: bool = False
    logprobs: bool = False


@dataclass(slots=True)
class Request:
    """One validated request, as a backend receives it: a chat (``messages``), or with ``prompt`` a raw or
    fill-in-the-middle completion (no chat template; see :mod:`unillm.completions`)."""

    id: str
    messages: list[Message]
    params: SamplingParams
    started: float = field(default_factory=time.perf_counter)
    prompt: Prompt | None = None


@dataclass(slots=True)
class Generation:
    """What a backend returns for a finished request; the engine wraps it into a ChatCompletion."""

    text: str
    finish_reason: str
    usage: Usage
    ttft_s: float | None
    decode_tokens_per_s: float | None
    #: With ``logprobs``: one OpenAI ``{"token", "logprob", "bytes", "top_logprobs"}`` per generated token.
    logprobs: list[dict[str, Any]] | None = None
    #: Tool calls the backend's library has already read, as (name, arguments) data (Ollama's daemon does).
    tool_calls: list[tuple[str, Any]] | None = None
    #: The stop string that ended it (None: the end token, the limit, or a backend that does not say).
    stop_sequence: str | None = None
    #: Reasoning the backend's library has already split from ``text`` (Ollama's daemon does).
    reasoning: str | None = None


@dataclass(slots=True)
class Piece:
    """One streamed piece of text; the last one has ``finish_reason`` and ``usage``."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    logprobs: list[dict[str, Any]] | None = None
    #: Tool calls the backend's library has already read, as (name, arguments) data.
    tool_calls: list[tuple[str, Any]] | None = None
    #: On the last piece: the stop string that ended the answer, if one did.
    stop_sequence: str | None = None
    #: Reasoning the backend's library has already split from ``text``.
    reasoning: str | None = None


class Backend(ABC):
    """One loaded (or loadable) model of one backend."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Its grammar can let the model reason before a JSON answer (llama.cpp's GBNF); elsewhere a JSON answer
    #: or a required call turns a reasoning model's thinking off.
    reasons_before_json: ClassVar[bool] = False
    #: The backend's library splits reasoning itself and takes ``think`` as it is (Ollama's daemon).
    own_reasoning: bool = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @abstractmethod
    async def load(self) -> None:
        """Load the model; raise ModelLoadError on failure."""

    @abstractmethod
    async def generate(self, request: Request) -> Generation:
        """Generate the whole answer."""

    @abstractmethod
    def stream(self, request: Request) -> AsyncGenerator[Piece, None]:
        """Generate piece by piece; closing the iterator early aborts the request."""

    @abstractmethod
    async def aclose(self) -> None:
        """Free the model's memory; idempotent."""

    @classmethod
    def embed_problem(cls, spec: ModelSpec) -> str | None:
        """Why this entry cannot embed, known before loading it (None: it can, or loading will tell)."""
        return None

    async def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        """One L2-normalized vector per text, and the number of tokens read. A text longer than the context
        window is a ContextWindowExceededError, or with ``truncate`` cut to the window's first tokens."""
        raise UnsupportedFeatureError(self.name, f"embeddings (model {self.spec.name!r})")

    async def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        """The model's token ids of ``text`` (``special``: control-token texts become those tokens; ``add_bos``: the
        model's BOS first, where it has one)."""
        raise UnsupportedFeatureError(self.name, f"tokenize (model {self.spec.name!r}: its tokenizer is not in this process)")

    async def detokenize(self, ids: list[int]) -> str:
        """The text of token ids."""
        raise UnsupportedFeatureError(self.name, f"detokenize (model {self.spec.name!r}: its tokenizer is not in this process)")

    async def chat_tokens(self, request: Request) -> int:
        """How many tokens the request's messages take once its chat template renders them."""
        raise UnsupportedFeatureError(self.name, f"count_tokens (model {self.spec.name!r}: its tokenizer is not in this process)")

    async def chat_prompt(self, request: Request) -> str:
        """The request's messages as the chat template renders them (the text the model reads)."""
        raise UnsupportedFeatureError(self.name, f"rendering the chat template (model {self.spec.name!r}: it is not in this process)")

    def fim(self) -> FimTokens | None:
        """The loaded model's FIM format (registry ``fim:`` block or its own tokens), None when it has none."""
        return None

    def dead(self) -> str | None:
        """Why this loaded backend can serve nothing more (its engine process died), or None. The engine
        unloads a dead backend after the failed request, and loads it again on the next call."""
        return None

    def map_exception(self, exc: Exception) -> UnillmError | None:
        """This backend's table from its library's exceptions to unillm's (None: a GenerationError)."""
        return None

    def sampling_defaults(self) -> dict[str, Any]:
        """Defaults the model itself carries (an Ollama Modelfile's parameters), under the registry's."""
        return {}

    def tool_call_parser(self, structure: Structure) -> ToolCallParser | None:
        """The library's own reader of this model's tool calls, for ``tool_choice="auto"``; None: unillm reads
        the Hermes ``<tool_call>`` format (what it asks for when the chat template has no tools of its own)."""
        return None

    def max_concurrency(self) -> int | None:
        """How many requests ``Engine.batch`` keeps in flight on this model (None: all at once)."""
        return None

    def family(self) -> Family:
        """The loaded model's family (:mod:`unillm.families`): the registry's ``chat_format``, else the one
        its chat template shows."""
        return family_of(self.spec.chat_format, self.chat_template())

    def chat_template(self) -> str | None:
        """The chat template this backend renders (None: none here, or not known in this process)."""
        return None

    def info(self) -> dict[str, Any]:
        """Facts about the loaded model (device, offload, KV cache...) for ``unillm models``."""
        return {}


def chat_inputs(request: Request, template: str | None, family: Family | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The request's messages (and tools, when the template renders them) for a chat template, with tool-call
    ids in the form the family's template accepts."""
    structure: Structure | None = request.params.structure
    msgs, tools = template_dicts(request.messages, structure.tools if structure is not None else (), template)
    if family is not None and family.call_ids != "any":
        for m in msgs:
            for c in m.get("tool_calls") or ():
                c["id"] = call_id(family, c["id"])
            if "tool_call_id" in m:
                m["tool_call_id"] = call_id(family, m["tool_call_id"])
    return msgs, tools


def think_inputs(request: Request, family: Family, template: str | None) -> tuple[dict[str, Any], str]:
    """(chat-template variables, text after the generation prompt) for the request's ``think``."""
    return template_kwargs(family, request.params.think, template)


def request_schema(request: Request) -> dict[str, Any] | None:
    """The JSON schema the answer must be constrained to (response_format, or a required tool call), in the
    form that grammar compilers are given (:attr:`Structure.constraint`)."""
    structure: Structure | None = request.params.structure
    return structure.constraint if structure is not None else None


def decode_rate(n_tokens: int, first_token_at: float | None, end: float) -> float | None:
    """Tokens after the first over the time after the first (the guide's "tokens per second")."""
    if first_token_at is None or n_tokens < 2 or end <= first_token_at:
        return None
    return (n_tokens - 1) / (end - first_token_at)


async def pieces_from_worker(
    start: Callable[[Callable[[Piece], None]], Awaitable[asyncio.Future[Generation]]], cancel: threading.Event
) -> AsyncGenerator[Piece, None]:
    """Stream the pieces that a worker thread emits, on the event loop.

    ``start(emit)`` begins the work and returns the future of its Generation; the worker calls ``emit``
    from its own thread. Closed or cancelled early, this sets ``cancel`` and waits until the worker has let
    go of the model, so the next request finds it free.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Piece | BaseException] = asyncio.Queue()

    def emit(piece: Piece) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    job = await start(emit)

    def on_done(f: asyncio.Future[Generation]) -> None:
        if not f.cancelled() and (exc := f.exception()) is not None:
            queue.put_nowait(exc)

    job.add_done_callback(on_done)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                break
    finally:
        cancel.set()
        with contextlib.suppress(BaseException):
            await asyncio.shield(job)


#: Clean-ups of loads whose caller went away (the loop holds tasks only weakly); Engine.close waits for them.
_ABANDONED: set[asyncio.Future[None]] = set()


async def abandoned_loads() -> None:
    """Wait until every abandoned load of this loop (this Engine's) has been freed."""
    loop = asyncio.get_running_loop()
    mine = [t for t in _ABANDONED if t.get_loop() is loop]
    if mine:
        await asyncio.gather(*mine, return_exceptions=True)


class ThreadedBackend(Backend):
    """A backend whose library blocks (llama.cpp, transformers): one worker thread per model does its work,
    requests are started by :meth:`_start` and stopped through cancel events, which unload sets too."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._executor: ThreadPoolExecutor | None = None
        self._cancels: set[threading.Event] = set()

    async def _start_worker(self, load: Callable[..., Any], *args: Any) -> None:
        """Create the model's worker thread and run ``load`` on it; on failure the thread goes too. A caller
        that gives up (Ctrl-C, a cancelled task) cannot stop the load in its thread: when it ends, what it made
        is freed (each interrupted load used to leak its model and thread)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"unillm-{self.name}-{self.spec.name}")
        loading = asyncio.get_running_loop().run_in_executor(self._executor, load, *args)
        try:
            await asyncio.shield(loading)
        except asyncio.CancelledError:
            task = asyncio.ensure_future(self._close_after(loading))
            _ABANDONED.add(task)
            task.add_done_callback(_ABANDONED.discard)
            raise
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def _close_after(self, loading: asyncio.Future[Any]) -> None:
        with contextlib.suppress(BaseException):
            await loading
        await self.aclose()

    def _stop_requests(self) -> ThreadPoolExecutor | None:
        """For unload: cancel what runs (it stops at its next token) and take the worker away from new requests."""
        for cancel in list(self._cancels):
            cancel.set()
        executor, self._executor = self._executor, None
        return executor

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._executor is None:
            raise ModelUnloadedError(self.spec.name)
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @abstractmethod
    async def _start(
        self, request: Request, cancel: threading.Event, emit: Callable[[Piece], None] | None
    ) -> asyncio.Future[Generation]:
        """Start a request; the future gets its Generation. ``emit`` receives pieces when streaming."""

    async def generate(self, request: Request) -> Generation:
        cancel = threading.Event()
        self._cancels.add(cancel)
        try:
            return await (await self._start(request, cancel, None))
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            self._cancels.discard(cancel)

    async def stream(self, request: Request) -> AsyncGenerator[Piece, None]:
        cancel = threading.Event()
        self._cancels.add(cancel)
        pieces = pieces_from_worker(lambda emit: self._start(request, cancel, emit), cancel)
        try:
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()
            self._cancels.discard(cancel)


class TokenizerText:
    """The text side of a backend whose tokenizer is a Hugging Face one (transformers', or the one vLLM's
    engine holds): chat templates rendered to ids or text, completion prompts (raw and FIM, with the
    tokenizer's own FIM tokens or the registry's block), tokenize and count. Blocking methods; the async ones
    run them on a thread."""

    name: ClassVar[str]
    spec: ModelSpec
    _text_cache: tuple[Any, TokenizerVocab, FimTokens | None] | None = None

    if TYPE_CHECKING:
        def family(self) -> Family: ...

    def _tokenizer(self) -> Any:
        """The loaded tokenizer (ModelUnloadedError when there is none)."""
        raise NotImplementedError

    def chat_template(self) -> str | None:
        try:
            return self._tokenizer().chat_template  # type: ignore[no-any-return]
        except ModelUnloadedError:
            return None

    def _vocab(self) -> tuple[TokenizerVocab, FimTokens | None]:
        """The tokenizer as prompts are built with it, and its own FIM tokens: looked up once per loaded
        tokenizer, not on every request."""
        tokenizer = self._tokenizer()
        cached = self._text_cache
        if cached is None or cached[0] is not tokenizer:
            vocab = TokenizerVocab(tokenizer)
            cached = self._text_cache = (tokenizer, vocab, family_tokens(vocab))
        return cached[1], cached[2]

    def _chat_ids(self, request: Request, tokenize: bool = True) -> Any:
        tokenizer = self._tokenizer()
        if not tokenizer.chat_template:
            raise UnsupportedFeatureError(self.name, f"chat with model {self.spec.name!r}: its tokenizer has no chat "
                                                     "template (a base model: use Engine.complete)")
        family = self.family()
        msgs, tools = chat_inputs(request, tokenizer.chat_template, family)
        kwargs, after = think_inputs(request, family, tokenizer.chat_template)
        with bounded(self.spec.name):
            text = str(tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)) + after
        if not tokenize:
            return text
        # The rendered text holds the BOS and control tokens as text (as transformers tokenizes its own render).
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, request: Request) -> tuple[list[int], list[str], frozenset[int]]:
        """The request's prompt ids, and the stop strings and tokens that a FIM format adds."""
        if request.prompt is None:
            return self._chat_ids(request), [], frozenset()
        vocab, native = self._vocab()
        fim = fim_tokens(self.spec.name, self.name, vocab, native, self.spec.fim) if request.prompt.fim else None
        ids = prompt_ids(vocab, fim, request.prompt, self.spec.name, self.name)
        return ids, list(fim.stop) if fim else [], fim.stop_ids if fim else frozenset()

    def fim(self) -> FimTokens | None:
        vocab, native = self._vocab()
        return fim_tokens(self.spec.name, self.name, vocab, native, self.spec.fim) if native or self.spec.fim else None

    async def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        return await asyncio.to_thread(tokens_of, self._vocab()[0], text, special, add_bos)

    async def detokenize(self, ids: list[int]) -> str:
        return await asyncio.to_thread(self._tokenizer().decode, ids)  # type: ignore[no-any-return]

    async def chat_prompt(self, request: Request) -> str:
        return await asyncio.to_thread(self._chat_ids, request, False)  # type: ignore[no-any-return]

    async def chat_tokens(self, request: Request) -> int:
        return len(await asyncio.to_thread(self._chat_ids, request))

