"""The Engine: one object that routes chat requests to in-process backends by model name.

All work happens on an event loop that the engine owns in a background thread. ``chat`` blocks the
calling thread (and only it); ``achat`` awaits from the caller's loop. Both go through one async core.

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                      # doctest: +SKIP
    ...     r = engine.chat("smollm2", [{"role": "user", "content": "Capital of France?"}], temperature=0)
    ...     "Paris" in r.text
    True
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import os
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

from typing_extensions import Unpack

from .backends import backend_class
from .backends.base import Backend, Generation, Piece, Request, abandoned_loads, new_request_id
from .errors import (
    BackendNotInstalledError,
    BackendUnavailableError,
    EngineClosedError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelUnloadedError,
    UnillmError,
    UnsupportedFeatureError,
)
from .completions import Prompt
from .textgen import CoreText, EngineText, started, totals
from .messages import validate_messages
from .params import ChatParams, SamplingParams, merge_params
from ._loop import LoopThread
from .registry import ModelSpec, Registry
from .families import Reasoning, check_think, split_reasoning, thinking
from .structured import Structure, ToolCallParser
from .system import give_memory_back, hardware_problem
from .types import (
    BatchResult,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    Completion,
    ChunkChoice,
    Delta,
    Embedding,
    EmbeddingResponse,
    Message,
    Timings,
    Usage,
)

#: A chat input (messages, or one user message as a string); in a batch, also a completion Prompt.
Messages = Sequence[Mapping[str, Any] | Message] | str


class _Core(CoreText):
    """The async core; every method runs on the engine's own loop."""

    def __init__(self, registry: Registry, fallbacks: bool, registry_max_tokens: bool = True) -> None:
        self.registry = registry
        self.fallbacks = fallbacks
        self.registry_max_tokens = registry_max_tokens
        self.backends: dict[str, Backend] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        #: Finished requests by how they ended: stop, length, cancelled (closed early), error.
        self.outcomes: Counter[str] = Counter()
        self._closing: set[asyncio.Future[None]] = set()

    async def backend_for(self, spec: ModelSpec) -> tuple[Backend, float]:
        """The loaded backend of a model, loading it on first use; returns the load time it took."""
        if (b := self.backends.get(spec.name)) is not None:
            return b, 0.0
        lock = self._load_locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            if (b := self.backends.get(spec.name)) is not None:
                return b, 0.0
            problem = await asyncio.to_thread(hardware_problem, spec)  # may run nvidia-smi
            if problem:
                raise ModelLoadError(spec.name, problem)
            cls = await asyncio.to_thread(backend_class, spec.backend, spec.name)  # heavy imports: off the loop
            t0 = time.perf_counter()
            backend = cls(spec)
            try:
                await backend.load()
            except UnillmError:
                raise
            except Exception as exc:  # noqa: BLE001 - any library failure while loading
                raise ModelLoadError(spec.name, f"{type(exc).__name__}: {exc}") from exc
            self.backends[spec.name] = backend
            return backend, time.perf_counter() - t0

    async def serving(self, model: str) -> tuple[ModelSpec, Backend, float, _Fallback | None]:
        """The model that will serve a call for ``model``: itself, or with fallbacks on, the first of its
        fallbacks (breadth first) that loads when it cannot (backend missing, no GPU, load failure)."""
        spec = self.registry.get(model)
        try:
            backend, load_s = await self.backend_for(spec)
            return spec, backend, load_s, None
        except _CANNOT_RUN as exc:
            if not spec.fallbacks:
                raise
            if not self.fallbacks:
                exc.args = (
                    f"{exc} Its registry entry lists fallbacks {spec.fallbacks}: Engine(fallbacks=True) or "
                    "UNILLM_FALLBACKS=1 sends the call to the first of them that runs here.",
                )
                raise
            first = exc
        reasons = [f"{spec.name}: {first}"]
        for candidate in self.registry.fallback_chain(spec.name)[1:]:
            try:
                backend, load_s = await self.backend_for(candidate)
            except _CANNOT_RUN as exc:
                reasons.append(f"{candidate.name}: {exc}")
                continue
            return candidate, backend, load_s, _Fallback(spec.name, "; ".join(reasons))
        first.args = (f"{first} No fallback runs either: " + "; ".join(reasons[1:]),)
        raise first

    async def _prepare(
        self, model: str, messages: Messages, params: dict[str, Any], prompt: Prompt | None = None
    ) -> tuple[ModelSpec, Backend, Request, float, _Fallback | None]:
        msgs = validate_messages(messages) if prompt is None else []
        spec, backend, load_s, fallback = await self.serving(model)
        if spec.task == "embed":
            what = "chat" if prompt is None else "completion"
            raise UnsupportedFeatureError(spec.backend, f"{what} with {spec.name!r}: its registry entry is an embedding model (task: embed); use Engine.embed")
        chat_only = sorted({"response_format", "tools", "tool_choice", "think"} & {k for k, v in params.items() if v is not None})
        if prompt is not None and chat_only:
            raise InvalidRequestError(f"{', '.join(chat_only)}: response_format, tools, tool_choice and think apply to chat, "
                                      "not to a completion")
        asked = [k for k in ("logprobs", "top_logprobs") if params.get(k)]
        if asked and not backend.capabilities.logprobs:
            raise UnsupportedFeatureError(spec.backend, f"{' and '.join(asked)} (model {spec.name!r}; llama.cpp and vLLM models return them)")
        sampling = merge_params({**backend.sampling_defaults(), **spec.defaults.model_dump(exclude_none=True)}, params)
        caps, structure = backend.capabilities, sampling.structure
        if structure is not None and structure.tools and not caps.tools:
            raise UnsupportedFeatureError(spec.backend, f"tools (model {spec.name!r})")
        if structure is not None and structure.mode == "json" and not caps.json_schema:
            raise UnsupportedFeatureError(spec.backend, f"response_format, a JSON answer (model {spec.name!r})")
        _reasoning_setting(spec, backend, sampling)
        if not self.registry_max_tokens and params.get("max_tokens") is None:
            sampling.max_tokens = None  # a client that sets no limit gets the end of the context (as Ollama, OpenAI)
        rid = new_request_id() if prompt is None else new_request_id("cmpl")
        return spec, backend, Request(rid, msgs, sampling, prompt=prompt), load_s, fallback

    async def generations(self, spec: ModelSpec, backend: Backend, req: Request) -> list[Generation]:
        """The request's ``n`` answers: n requests of the same prompt, each with its own seed (seed + i when a
        seed is given)."""
        reqs = [req] + [
            dataclasses.replace(req, id=f"{req.id}-{i}", params=dataclasses.replace(
                req.params, seed=None if req.params.seed is None else (req.params.seed + i) % 2**32))
            for i in range(1, req.params.n)
        ]
        with self._errors(spec, backend):
            gens: list[Generation] = list(await asyncio.gather(*(backend.generate(r) for r in reqs)))
        if any(g.finish_reason == "cancelled" for g in gens):  # only unload or close stops a call nobody cancelled
            raise ModelUnloadedError(spec.name)
        return gens

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count a request that fails (``error``) or whose caller gives up (``cancelled``)."""
        try:
            yield
        except asyncio.CancelledError:
            self.outcomes["cancelled"] += 1
            raise
        except UnillmError:
            self.outcomes["error"] += 1
            raise

    async def chat(self, model: str, messages: Messages, params: dict[str, Any]) -> ChatCompletion:
        spec, backend, req, load_s, fallback = await self._prepare(model, messages, params)
        structure: Structure | None = req.params.structure
        family = backend.family()
        on = thinking(family, req.params.think) and not backend.own_reasoning
        with self.counted():
            gens = await self.generations(spec, backend, req)
            choices = []
            for i, gen in enumerate(gens):
                _check_calls_asked(spec, structure, gen.tool_calls)
                reasoning, text = (gen.reasoning, gen.text) if backend.own_reasoning else split_reasoning(family, on, gen.text)
                if structure is not None:
                    message, finish = structure.finish(spec.name, text, gen.finish_reason, _parser(backend, structure), gen.tool_calls)
                else:
                    message, finish = Message("assistant", text), gen.finish_reason
                message.reasoning_content = reasoning or None
                lp = {"content": gen.logprobs} if gen.logprobs is not None else None
                choices.append(Choice(i, message, finish, lp, gen.stop_sequence if finish == "stop" else None))
        for c in choices:
            self.outcomes[c.finish_reason or "stop"] += 1
        usage, timings = totals(gens, req, load_s)
        return ChatCompletion(
            id=req.id,
            model=spec.name,
            backend=spec.backend,
            choices=choices,
            usage=usage,
            timings=timings,
            requested_model=fallback.requested if fallback else None,
            fallback_reason=fallback.reason if fallback else None,
        )

    async def batch(
        self, model: str, items: Sequence[Messages | Prompt], params: dict[str, Any], *, progress: bool = True,
        concurrency: int | None = None, on_result: Callable[[BatchResult], None] | None = None,
    ) -> list[BatchResult]:
        """Many items through one model, in input order, one failure isolated, with a progress bar. Loads the
        model first: a model that cannot load fails the whole batch."""
        from tqdm.auto import tqdm

        _, backend, _, _ = await self.serving(model)
        gate = asyncio.Semaphore(concurrency or backend.max_concurrency() or len(items) or 1)
        started = time.perf_counter()
        done = failed = tokens = 0
        bar = tqdm(total=len(items), desc=model, unit="doc", disable=not progress, dynamic_ncols=True)
        # on_result (a job appends and fsyncs each record) runs on one thread of its own, in completion order:
        # never on the loop that all models share.
        callbacks = ThreadPoolExecutor(1, thread_name_prefix="unillm-on-result") if on_result is not None else None
        loop = asyncio.get_running_loop()

        async def one(i: int, item: Messages | Prompt) -> BatchResult:
            nonlocal done, failed, tokens
            async with gate:
                try:
                    if isinstance(item, Prompt):
                        res = BatchResult(i, response=await self.complete(model, item, params))
                    else:
                        res = BatchResult(i, response=await self.chat(model, item, params))
                except UnillmError as exc:
                    res = BatchResult(i, error=exc)
            if isinstance(res.response, (ChatCompletion, Completion)) and res.response.usage is not None:
                done += 1
                tokens += res.response.usage.completion_tokens
            else:
                failed += 1
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix_str(f"{tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s, {failed} failed", refresh=False)
            if on_result is not None:
                await loop.run_in_executor(callbacks, on_result, res)
            return res

        tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # on_result failed (a job cannot keep its output) or the caller gave up: stop them all
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            if callbacks is not None:
                callbacks.shutdown(wait=False)

    async def open_stream(self, model: str, messages: Messages, params: dict[str, Any]) -> AsyncGenerator[ChatCompletionChunk, None]:
        """Start a stream and wait for its first chunk, so that bad requests fail here, not later."""
        if params.get("n", 1) != 1:
            raise InvalidRequestError("n > 1 is not streamed by unillm: ask without stream, or for one answer")
        spec, backend, req, load_s, fallback = await self._prepare(model, messages, params)
        return await started(self._chunks(spec, backend, req, load_s, fallback))

    async def _chunks(
        self, spec: ModelSpec, backend: Backend, req: Request, load_s: float, fallback: _Fallback | None
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        role: str | None = "assistant"
        structure: Structure | None = req.params.structure
        family = backend.family()
        shaper = structure.streamer(_parser(backend, structure), family.markers, family.leading) if structure is not None else None
        splitter = Reasoning(family, thinking(family, req.params.think) and not backend.own_reasoning)
        pieces = backend.stream(req)

        def chunk(delta: Delta, piece: Piece | None = None, finish: str | None = None) -> ChatCompletionChunk:
            lp = {"content": piece.logprobs} if piece is not None and piece.logprobs is not None else None
            stop = piece.stop_sequence if piece is not None and finish == "stop" else None
            c = ChatCompletionChunk(
                id=req.id, model=spec.name, backend=spec.backend, choices=[ChunkChoice(0, delta, finish, lp, stop)],
                requested_model=fallback.requested if fallback else None,
                fallback_reason=fallback.reason if fallback else None,
            )
            if finish is not None and piece is not None:
                c.usage = piece.usage
                c.timings = Timings(load_s, piece.ttft_s, time.perf_counter() - req.started, piece.decode_tokens_per_s)
            return c

        async with self.reading(spec, backend, pieces) as tally:
            async for piece in pieces:
                if piece.tool_calls:
                    _check_calls_asked(spec, shaper.s if shaper is not None else None, piece.tool_calls)
                    assert shaper is not None
                    shaper.given.extend(piece.tool_calls)
                if backend.own_reasoning:
                    reasoning, answer = piece.reasoning or "", piece.text
                else:
                    reasoning, answer = splitter.feed(piece.text)
                    if piece.finish_reason is not None:
                        more, rest = splitter.end()
                        reasoning, answer = reasoning + more, answer + rest
                text = shaper.feed(answer) if shaper is not None else answer
                if piece.finish_reason is None:
                    calls = shaper.call_deltas() if shaper is not None else None
                    if text or piece.logprobs or calls or reasoning:
                        yield chunk(Delta(role, text if text or not (calls or reasoning) else None, tool_calls=calls or None,
                                          reasoning_content=reasoning or None), piece)
                        role = None
                    continue
                finish, calls = piece.finish_reason, None
                if finish == "cancelled":  # the stream is still being read: unload or close stopped it
                    raise ModelUnloadedError(spec.name)
                if shaper is not None:
                    rest, calls, finish = shaper.end(spec.name, piece.finish_reason)
                    text += rest
                tally.outcome = finish
                if reasoning:
                    yield chunk(Delta(role, None, reasoning_content=reasoning))
                    role = None
                if calls:
                    yield chunk(Delta(role, text or None, tool_calls=calls))
                    role, text = None, ""
                yield chunk(Delta(role, text), piece, finish)
                role = None

    @contextlib.asynccontextmanager
    async def reading(self, spec: ModelSpec, backend: Backend, pieces: AsyncGenerator[Piece, None]) -> AsyncIterator[Tally]:
        """A backend's stream being read: its library's errors mapped, how it ended counted (``cancelled``
        unless the reader sets the tally's outcome or it fails), and the stream closed however it ends."""
        tally = Tally()
        try:
            with self._errors(spec, backend):
                yield tally
        except UnillmError:
            tally.outcome = "error"
            raise
        finally:
            self.outcomes[tally.outcome] += 1
            await pieces.aclose()

    @contextlib.contextmanager
    def _errors(self, spec: ModelSpec, backend: Backend) -> Iterator[None]:
        """Map what a backend's library raises to unillm's errors (the backend's own table first, then
        GenerationError); a backend that died with it is unloaded, to load again on the next call."""
        try:
            yield
        except UnillmError as exc:
            self._evict_if_dead(spec, backend, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - any library failure
            mapped = backend.map_exception(exc) or GenerationError(spec.name, f"{type(exc).__name__}: {exc}")
            self._evict_if_dead(spec, backend, mapped)
            raise mapped from exc

    def _evict_if_dead(self, spec: ModelSpec, backend: Backend, exc: UnillmError) -> None:
        reason = backend.dead()
        if reason is None or self.backends.get(spec.name) is not backend:
            return
        del self.backends[spec.name]
        task = asyncio.ensure_future(backend.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        exc.args = (f"{exc} {reason}: the model was unloaded and loads again on the next call.",)

    async def embed(self, model: str, texts: str | Sequence[str], truncate: bool = False) -> EmbeddingResponse:
        items = [texts] if isinstance(texts, str) else texts
        if not isinstance(items, Sequence) or not items or not all(isinstance(t, str) and t for t in items):
            raise InvalidRequestError("input must be a non-empty string or a non-empty list of non-empty strings")
        wanted = self.registry.get(model)
        loaded = self.backends.get(wanted.name)
        cls = type(loaded) if loaded is not None else await asyncio.to_thread(backend_class, wanted.backend, wanted.name)
        if (problem := cls.embed_problem(wanted)) is not None:
            raise UnsupportedFeatureError(wanted.backend, problem)
        spec, backend, _, _ = await self.serving(model)
        if not backend.capabilities.embeddings:
            raise UnsupportedFeatureError(spec.backend, f"embeddings (model {spec.name!r})")
        try:
            with self._errors(spec, backend):
                vectors, tokens = await backend.embed(list(items), truncate)
        except UnillmError:
            self.outcomes["error"] += 1
            raise
        self.outcomes["embeddings"] += 1
        return EmbeddingResponse(spec.name, spec.backend, [Embedding(i, v) for i, v in enumerate(vectors)], Usage(tokens, 0))

    async def unload(self, model: str) -> bool:
        spec = self.registry.get(model)
        backend = self.backends.pop(spec.name, None)
        if backend is None:
            return False
        await backend.aclose()
        del backend
        await asyncio.to_thread(give_memory_back)
        return True

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await abandoned_loads()
        while self.backends:
            _, backend = self.backends.popitem()
            await backend.aclose()


def _check_calls_asked(spec: ModelSpec, structure: Structure | None, calls: list[tuple[str, Any]] | None) -> None:
    """Tool calls a backend's library read are only taken where tools were offered and none was forced."""
    if calls and (structure is None or structure.mode != "auto"):
        raise GenerationError(spec.name, f"{spec.backend} returned tool calls that were not asked for")


def _parser(backend: Backend, structure: Structure) -> ToolCallParser | None:
    """The tool-call reader where the model may choose to call (``auto``): the backend's library's own, else
    the model family's (None: Hermes ``<tool_call>`` blocks)."""
    if structure.mode != "auto":
        return None
    return backend.tool_call_parser(structure) or backend.family().read_calls


def _reasoning_setting(spec: ModelSpec, backend: Backend, sampling: SamplingParams) -> None:
    """Check the request's ``think`` against the model's family. A JSON answer or a required call from a
    reasoning model whose backend cannot constrain the answer after the reasoning (only llama.cpp's grammar
    can) asks it not to think."""
    if backend.own_reasoning:
        return
    family = backend.family()
    check_think(family, sampling.think, spec.name)
    structure = sampling.structure
    if structure is None or structure.mode == "auto" or not thinking(family, sampling.think) or backend.reasons_before_json:
        return
    if sampling.think is True:
        raise InvalidRequestError(f"think=true with a JSON answer or a required tool call: model {spec.name!r} runs on "
                                  f"{spec.backend}, whose constrained decoding cannot let it reason first (llama.cpp's can); "
                                  "use think=false")
    sampling.think = False


def _close_at_exit(ref: weakref.ReferenceType[Engine]) -> Callable[[], None]:
    def close() -> None:
        engine = ref()
        if engine is not None:
            engine.close()

    return close


#: Engines still open, closed when the interpreter ends.
_OPEN: weakref.WeakSet[Engine] = weakref.WeakSet()
_exit_hook = False


def _close_open_engines() -> None:
    for engine in list(_OPEN):
        engine.close()


def _register_exit_hook() -> None:
    """Close forgotten engines before Python shuts the thread pools down. Plain ``atexit`` runs after
    ``concurrent.futures`` has refused new work ("cannot schedule new futures after shutdown", a traceback at
    the end of every script that did not close its Engine); ``threading._register_atexit`` hooks run before
    it, the later-registered first."""
    global _exit_hook
    if _exit_hook:
        return
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_close_open_engines)
            _exit_hook = True
        except RuntimeError:  # the interpreter is shutting down already
            pass


@dataclass(slots=True)
class Tally:
    """How a stream ended, for ``Engine.stats``."""

    outcome: str = "cancelled"


@dataclass(frozen=True, slots=True)
class _Fallback:
    requested: str
    reason: str


# What makes a model unable to run here, as opposed to a bad request: these trigger fallbacks.
_CANNOT_RUN = (BackendNotInstalledError, BackendUnavailableError, ModelLoadError)


class Engine(EngineText):
    """Runs registry models in this process and routes each call by model name.

    Args:
        config: extra registry file(s) layered on top of the defaults (see :mod:`unillm.registry`).
        builtin: also load the shipped registry and the user/project/``UNILLM_CONFIG`` files.
        registry: a ready :class:`Registry` instead of files.
        fallbacks: when a model cannot run here (backend missing, no GPU, load failure), serve the call
            with the first of its registry ``fallbacks`` that can; the result's ``requested_model`` and
            ``fallback_reason`` say so. Default: off, or ``UNILLM_FALLBACKS=1``.
        registry_max_tokens: a call that sets no ``max_tokens`` is capped by its entry's ``defaults.max_tokens``
            (when the entry sets one). ``unillm serve`` turns it off: a client that sends no limit generates
            until a stop or the end of the context window, as with Ollama and OpenAI.

    Example:
        >>> from unillm import Engine
        >>> engine = Engine()
        >>> "smollm2" in engine.registry
        True
        >>> engine.close()
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        *,
        builtin: bool = True,
        registry: Registry | None = None,
        fallbacks: bool | None = None,
        registry_max_tokens: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else Registry.load(config, builtin=builtin)
        if fallbacks is None:
            fallbacks = os.environ.get("UNILLM_FALLBACKS", "").lower() in ("1", "true", "yes")
        self._core = _Core(self.registry, fallbacks, registry_max_tokens)
        self._loop = LoopThread()
        self._closed = False
        #: The process that owns the models and the loop thread; a forked child has neither.
        self._pid = os.getpid()
        # A process that ends without close() still frees its models (vLLM's engine processes above all).
        self._atexit = _close_at_exit(weakref.ref(self))
        atexit.register(self._atexit)  # where the hook below is not there
        _OPEN.add(self)
        _register_exit_hook()

    # -- chat ---------------------------------------------------------------------------------------

    @overload
    def chat(
        self, model: str, messages: Messages, *, stream: Literal[False] = False, **params: Unpack[ChatParams],
    ) -> ChatCompletion: ...

    @overload
    def chat(
        self, model: str, messages: Messages, *, stream: Literal[True], **params: Unpack[ChatParams],
    ) -> Iterator[ChatCompletionChunk]: ...

    def chat(
        self, model: str, messages: Messages, *, stream: bool = False, **params: Unpack[ChatParams],
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """Answer ``messages`` with ``model``; with ``stream=True``, an iterator of chunks.

        ``messages`` is a list of ``{"role", "content"}`` dicts (or one string, a user message). Parameters
        left as None take the registry's defaults for the model; ``extra`` passes backend-specific options
        (for llama.cpp: top_k, min_p, repeat_penalty, grammar, ...).

        Example:
            >>> from unillm import Engine
            >>> with Engine() as engine:                              # doctest: +SKIP
            ...     for chunk in engine.chat("smollm2", "Say hi", stream=True, max_tokens=8):
            ...         print(chunk.text, end="")
        """
        self._check_open()
        if stream:
            agen = self._loop.run(self._core.open_stream(model, messages, dict(params)))
            return self._loop.iterate(agen)
        return self._loop.run(self._core.chat(model, messages, dict(params)))

    @overload
    async def achat(
        self, model: str, messages: Messages, *, stream: Literal[False] = False, **params: Unpack[ChatParams],
    ) -> ChatCompletion: ...

    @overload
    async def achat(
        self, model: str, messages: Messages, *, stream: Literal[True], **params: Unpack[ChatParams],
    ) -> AsyncIterator[ChatCompletionChunk]: ...

    async def achat(
        self, model: str, messages: Messages, *, stream: bool = False, **params: Unpack[ChatParams],
    ) -> ChatCompletion | AsyncIterator[ChatCompletionChunk]:
        """The async twin of :meth:`chat`; with ``stream=True`` it returns an async iterator.

        Example:
            >>> import asyncio
            >>> from unillm import Engine
            >>> async def main():                                      # doctest: +SKIP
            ...     async with Engine() as engine:
            ...         async for chunk in await engine.achat("smollm2", "Say hi", stream=True):
            ...             print(chunk.text, end="")
            >>> asyncio.run(main())                                    # doctest: +SKIP
        """
        self._check_open()
        if stream:
            agen = await self._loop.run_async(self._core.open_stream(model, messages, dict(params)))
            return self._loop.aiterate(agen)
        return await self._loop.run_async(self._core.chat(model, messages, dict(params)))

    # -- batches ------------------------------------------------------------------------------------

    def batch(
        self, model: str, items: Sequence[Messages | Prompt], *, progress: bool = True, concurrency: int | None = None,
        on_result: Callable[[BatchResult], None] | None = None, **params: Unpack[ChatParams],
    ) -> list[BatchResult]:
        """Answer many items (message lists or prompt strings); results come back in input order.

        An item that fails (too long, bad messages) gets a result with ``error`` set and does not stop the
        others. GGUF models with ``options.parallel`` > 1 decode many items per step; ``concurrency`` caps how
        many are in flight (default: what the backend can use). ``progress`` shows a tqdm bar (terminal or
        Jupyter) with documents/s and tokens/s. ``on_result`` is called with each result as it completes
        (one call at a time, on a thread of its own, never on the loop the models share), e.g. to append it
        to a file.

        Example:
            >>> from unillm import Engine
            >>> with Engine() as engine:                              # doctest: +SKIP
            ...     for r in engine.batch("smollm2", ["Name a fruit.", "Name a tree."], max_tokens=16):
            ...         print(r.index, r.text if r.ok else r.error)
        """
        self._check_open()
        return self._loop.run(
            self._core.batch(model, items, dict(params), progress=progress, concurrency=concurrency, on_result=on_result)
        )

    async def abatch(
        self, model: str, items: Sequence[Messages | Prompt], *, progress: bool = True, concurrency: int | None = None,
        on_result: Callable[[BatchResult], None] | None = None, **params: Unpack[ChatParams],
    ) -> list[BatchResult]:
        """The async twin of :meth:`batch`."""
        self._check_open()
        return await self._loop.run_async(
            self._core.batch(model, items, dict(params), progress=progress, concurrency=concurrency, on_result=on_result)
        )

    # -- embeddings ---------------------------------------------------------------------------------

    def embed(self, model: str, texts: str | Sequence[str], *, truncate: bool = False) -> EmbeddingResponse:
        """One L2-normalized vector per text, in order (``r.data[i].embedding``, ``r.vectors``), with usage.

        GGUF models pool their token vectors (mean by default, ``options.pooling``), transformers mean-pools
        the last hidden states, Ollama answers through its ``/api/embed``. A text longer than the context window
        is a ContextWindowExceededError; with ``truncate=True`` its first context-window tokens are embedded.

        Example:
            >>> from unillm import Engine
            >>> with Engine() as engine:                              # doctest: +SKIP
            ...     r = engine.embed("smollm2", ["a cat on a mat", "quarterly revenue"])
            ...     len(r.vectors), r.usage.prompt_tokens
        """
        self._check_open()
        return self._loop.run(self._core.embed(model, texts, truncate))

    async def aembed(self, model: str, texts: str | Sequence[str], *, truncate: bool = False) -> EmbeddingResponse:
        """The async twin of :meth:`embed`."""
        self._check_open()
        return await self._loop.run_async(self._core.embed(model, texts, truncate))

    # -- models -------------------------------------------------------------------------------------

    def load(self, model: str) -> float:
        """Load a model now instead of on first use; returns the seconds it took (0.0 if loaded)."""
        self._check_open()
        return self._loop.run(self._aload(model))

    async def aload(self, model: str) -> float:
        self._check_open()
        return await self._loop.run_async(self._aload(model))

    async def _aload(self, model: str) -> float:
        return (await self._core.serving(model))[2]

    def unload(self, model: str) -> bool:
        """Free a loaded model's memory; returns False when it was not loaded."""
        self._check_open()
        return self._loop.run(self._core.unload(model))

    async def aunload(self, model: str) -> bool:
        self._check_open()
        return await self._loop.run_async(self._core.unload(model))

    @property
    def fallbacks(self) -> bool:
        """Whether a call for a model that cannot run here goes to its registry ``fallbacks``."""
        return self._core.fallbacks

    def loaded(self) -> list[str]:
        """Names of the models loaded now."""
        return list(self._core.backends)

    def stats(self) -> dict[str, Any]:
        """Requests finished so far by how they ended (``stop``, ``length``, ``cancelled``, ``error``),
        and the models loaded now."""
        return {"requests": dict(self._core.outcomes), "loaded": self.loaded()}

    def backend(self, model: str) -> Backend | None:
        """The loaded backend object of a model (None when not loaded), for its ``info()``."""
        return self._core.backends.get(self.registry.get(model).name)

    # -- lifecycle ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("this Engine is closed; create a new one")
        if self._forked():
            raise EngineClosedError(
                f"this Engine was created in process {self._pid}; a forked child (process {os.getpid()}) has none "
                "of its models or threads: create an Engine in the child (or start children with the 'spawn' "
                "method: multiprocessing.set_start_method('spawn'))"
            )

    def _forked(self) -> bool:
        return os.getpid() != self._pid

    def close(self) -> None:
        """Unload every model and stop the engine's thread. Idempotent. In a forked child it only marks the
        engine closed: the models and the thread belong to the parent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if self._forked():
            return
        try:
            self._loop.run(self._core.aclose())
        finally:
            self._loop.stop()

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if self._forked():
            return
        try:
            await self._loop.run_async(self._core.aclose())
        finally:
            await asyncio.to_thread(self._loop.stop)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"loaded={self.loaded()}"
        return f"<Engine models={len(self.registry)} {state}>"
