"""Ollama models: through the official ``ollama`` client, or from Ollama's store without the daemon.

With a daemon, requests go to ``/api/chat`` on the entry's ``options.host`` (else ``OLLAMA_HOST``, else
127.0.0.1:11434) with ``num_ctx`` set to the registry's context window, so Ollama's own default (and its
silent truncation) does not apply. Without one, ``options.local_store`` decides: ``fallback`` (default) loads
the GGUF that ``ollama pull`` stored (sha256-checked) in-process with llama.cpp, applying the stored
parameters and system prompt; ``always`` does so even when a daemon runs; ``never`` raises.

Registry options: ``host``, ``keep_alive``, ``timeout`` (seconds), ``concurrency`` (requests in flight in
a batch), ``local_store``, ``store`` (the store's folder; default ``OLLAMA_MODELS`` or ``~/.ollama/models``),
``llamacpp`` (options for the in-process path).

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                     # doctest: +SKIP
    ...     engine.chat("llama3.1:8b", "Hello!").text
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any


from .. import ollama_store
from ..completions import FimTokens
from ..families import Family
from ..errors import (
    UnsupportedFeatureError,
    BackendNotInstalledError,
    BackendUnavailableError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelUnloadedError,
)
from ..registry import ModelSpec, Source
from ..system import ollama_host
from ..types import Message, Usage
from ..structured import Structure, loads_arguments
from ..options import OllamaOptions, parse_options
from .base import Backend, Capabilities, Generation, Piece, Request, chat_inputs, decode_rate

try:
    import httpx
    import ollama
except ImportError as _exc:  # pragma: no cover
    raise BackendNotInstalledError("ollama", "ollama", "ollama") from _exc


class OllamaBackend(Backend):
    name = "ollama"
    capabilities = Capabilities(streaming=True, json_schema=True, tools=True, embeddings=True)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.options = parse_options(OllamaOptions, spec)
        self.tag = spec.source.ollama or spec.name
        self.host = ollama_host(spec)
        self.client: ollama.AsyncClient | None = None
        self.local: Backend | None = None
        self.stored: ollama_store.StoredModel | None = None
        self.served_from = ""

    # -- load ---------------------------------------------------------------------------------------

    async def load(self) -> None:
        if self.options.local_store == "always":
            await self._load_local()
            return
        client = ollama.AsyncClient(host=self.host, timeout=httpx.Timeout(self.options.timeout, connect=self.options.connect_timeout))
        try:
            with self._mapped():
                await client.show(self.tag)
        except BackendUnavailableError as exc:
            await client.close()
            if self.options.local_store == "fallback" and self._in_store():
                await self._load_local()
                return
            store = " (nor is it in the local Ollama store)" if self.options.local_store == "fallback" else ""
            raise BackendUnavailableError(f"{exc}{store}") from exc
        except BaseException:
            await client.close()
            raise
        self.client = client
        self.served_from = self.host
        self.own_reasoning = True  # the daemon splits the reasoning (message.thinking) and takes think

    def _store_root(self) -> Path:
        return Path(self.options.store).expanduser() if self.options.store else ollama_store.store_root()

    def _in_store(self) -> bool:
        host, ns, model, tag = ollama_store.split_name(self.tag)
        return (self._store_root() / "manifests" / host / ns / model / tag).is_file()

    async def _load_local(self) -> None:
        import asyncio

        from .llamacpp import LlamaCppBackend

        stored = await asyncio.to_thread(
            ollama_store.find, self.tag, self._store_root(), verify=self.options.verify_sha256
        )
        spec = self.spec.model_copy(
            update={"backend": "llamacpp", "source": Source(path=str(stored.gguf)), "options": self.options.llamacpp.model_dump(exclude_unset=True)}
        )
        local = LlamaCppBackend(spec)
        await local.load()
        self.stored, self.local = stored, local
        self.served_from = f"the Ollama store ({stored.gguf}), in-process"

    def family(self) -> Family:
        return self.local.family() if self.local is not None else super().family()

    def sampling_defaults(self) -> dict[str, Any]:
        return ollama_store.sampling_defaults(self.stored.params) if self.stored else {}

    def info(self) -> dict[str, Any]:
        return {"served_from": self.served_from, "tag": self.tag, "host": self.host}

    def max_concurrency(self) -> int | None:
        return self.local.max_concurrency() if self.local is not None else self.options.concurrency

    async def aclose(self) -> None:
        local, self.local = self.local, None
        if local is not None:
            await local.aclose()
        client, self.client = self.client, None
        if client is not None:
            await client.close()

    # -- requests -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        """Map the client's exceptions to unillm's, naming the host and the model."""
        try:
            yield
        except ollama.ResponseError as exc:
            if exc.status_code == 404:
                said = str(exc.error).lower()
                if "model" not in said and "pull" not in said:
                    raise BackendUnavailableError(
                        f"{self.host} answered 404 ({str(exc.error)[:80]!r}) for model {self.spec.name!r}: "
                        "it does not look like an Ollama server; check options.host / OLLAMA_HOST"
                    ) from exc
                raise ModelLoadError(
                    self.spec.name, f"Ollama at {self.host} does not have {self.tag!r}: run `ollama pull {self.tag}`"
                ) from exc
            raise GenerationError(self.spec.name, f"Ollama at {self.host} answered: {exc}") from exc
        except (ConnectionError, httpx.ConnectError) as exc:
            raise BackendUnavailableError(
                f"No Ollama daemon answers at {self.host} (model {self.spec.name!r}): start `ollama serve`, "
                "or set options.host / OLLAMA_HOST"
            ) from exc
        except httpx.TimeoutException as exc:
            which = "connect" if isinstance(exc, httpx.ConnectTimeout) else "answer"
            limit = self.options.connect_timeout if which == "connect" else self.options.timeout
            raise BackendUnavailableError(
                f"Ollama at {self.host} did not {which} within {limit:g} s (model {self.spec.name!r}; "
                f"options.{'connect_timeout' if which == 'connect' else 'timeout'} sets the limit)"
            ) from exc
        except httpx.TransportError as exc:
            raise GenerationError(self.spec.name, f"the connection to Ollama at {self.host} broke: {exc!r}") from exc

    def _with_system(self, request: Request) -> Request:
        if self.stored and self.stored.system and not any(m.role == "system" for m in request.messages):
            request.messages = [Message("system", self.stored.system), *request.messages]
        return request

    def _call(self, request: Request, stream: bool) -> dict[str, Any]:
        p = request.params
        extra = dict(p.extra)
        fmt = extra.pop("format", None)
        structure: Structure | None = p.structure
        tools = None
        if structure is not None:
            if fmt is not None:
                raise InvalidRequestError("extra format and a JSON schema (response_format or a required tool call) "
                                          "both constrain the answer: give one")
            fmt = structure.constraint  # Ollama's format= takes a JSON schema (its grammar spells out bounds too)
            if structure.mode == "auto":
                tools = list(structure.tools)
        options: dict[str, Any] = {"temperature": p.temperature, "top_p": p.top_p, "num_ctx": self.spec.context_window}
        if p.max_tokens is not None:
            options["num_predict"] = p.max_tokens
        if p.stop:
            options["stop"] = p.stop
        if p.seed is not None:
            options["seed"] = p.seed
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(p, name):
                options[name] = getattr(p, name)
        options.update(extra)  # Ollama's own options (top_k, repeat_penalty, num_gpu...), passed through
        if structure is not None and structure.mode == "call":
            messages, _ = chat_inputs(request, None)  # the tools in the system prompt; format= forces one call
        else:
            messages = ollama_messages(request.messages)
        return {
            "model": self.tag, "messages": messages, "tools": tools, "think": p.think,
            "options": options, "format": fmt, "keep_alive": self.options.keep_alive, "stream": stream,
        }

    async def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        if self.local is not None:
            return await self.local.embed(texts, truncate)
        if self.client is None:
            raise ModelUnloadedError(self.spec.name)
        with self._mapped():
            r = await self.client.embed(model=self.tag, input=texts, truncate=truncate, keep_alive=self.options.keep_alive)
        return [list(map(float, v)) for v in r.embeddings], int(r.prompt_eval_count or 0)

    def _completion_call(self, request: Request, stream: bool) -> dict[str, Any]:
        """An /api/generate call for a completion: raw (no template) for a plain prompt; with a suffix, the
        model's template puts the prefix and suffix in its FIM format (Ollama's ``.Suffix``)."""
        prompt = request.prompt
        assert prompt is not None
        if isinstance(prompt.text, list) or prompt.files:
            what = "token ids as the prompt" if isinstance(prompt.text, list) else "repository context (files)"
            raise UnsupportedFeatureError("ollama", f"{what} through an Ollama daemon (model {self.spec.name!r})")
        call = self._call(request, stream)
        if call["tools"] or call["format"] is not None:
            raise InvalidRequestError("tools and JSON output do not apply to a completion")
        call.pop("think")
        return {"model": self.tag, "prompt": prompt.text, "suffix": prompt.suffix, "raw": prompt.suffix is None,
                "options": call["options"], "keep_alive": call["keep_alive"], "stream": stream}

    async def _api(self, request: Request, stream: bool) -> Any:
        assert self.client is not None
        if request.prompt is not None:
            return await self.client.generate(**self._completion_call(request, stream))
        return await self.client.chat(**self._call(request, stream=stream))

    async def generate(self, request: Request) -> Generation:
        if self.local is not None:
            return await self.local.generate(self._with_system(request))
        with self._mapped():
            r = await self._api(request, stream=False)
        return _generation(r, None, request)

    async def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        return await (self.local.tokenize(text, special, add_bos) if self.local is not None else super().tokenize(text, special))

    async def detokenize(self, ids: list[int]) -> str:
        return await (self.local.detokenize(ids) if self.local is not None else super().detokenize(ids))

    async def chat_tokens(self, request: Request) -> int:
        if self.local is None:
            return await super().chat_tokens(request)
        return await self.local.chat_tokens(self._with_system(request))

    async def chat_prompt(self, request: Request) -> str:
        if self.local is None:
            return await super().chat_prompt(request)
        return await self.local.chat_prompt(self._with_system(request))

    def fim(self) -> FimTokens | None:
        return self.local.fim() if self.local is not None else None

    async def stream(self, request: Request) -> AsyncGenerator[Piece, None]:
        if self.local is not None:
            pieces = self.local.stream(self._with_system(request))
            try:
                async for piece in pieces:
                    yield piece
            finally:
                await pieces.aclose()
            return
        first_at: float | None = None
        with self._mapped():
            chunks = await self._api(request, stream=True)
            try:
                async for c in chunks:
                    text, calls, thought = _text(c), _calls(c), _thinking(c)
                    if (text or calls or thought) and first_at is None:
                        first_at = time.perf_counter()
                    if c.done:
                        g = _generation(c, first_at, request)
                        yield Piece(text, g.finish_reason, g.usage, g.ttft_s, g.decode_tokens_per_s, tool_calls=calls, reasoning=thought)
                        return
                    if text or calls or thought:
                        yield Piece(text, tool_calls=calls, reasoning=thought)
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]  # closes the HTTP stream: Ollama stops
        raise GenerationError(self.spec.name, f"Ollama at {self.host} ended the stream without a final message")


def _generation(r: Any, first_at: float | None, request: Request) -> Generation:
    """Usage and timings from Ollama's counters (durations are nanoseconds)."""
    n = r.eval_count or 0
    ttft = first_at - request.started if first_at is not None else (
        ((r.load_duration or 0) + (r.prompt_eval_duration or 0)) / 1e9 if r.prompt_eval_duration else None
    )
    rate = n / (r.eval_duration / 1e9) if r.eval_duration else decode_rate(n, first_at, time.perf_counter())
    finish = "length" if r.done_reason == "length" else "stop"
    return Generation(_text(r), finish, Usage(r.prompt_eval_count or 0, n), ttft, rate, tool_calls=_calls(r), reasoning=_thinking(r))


def _thinking(r: Any) -> str | None:
    """The reasoning the daemon split from a thinking model's answer (``message.thinking``)."""
    return getattr(getattr(r, "message", None), "thinking", None) or None


def _text(r: Any) -> str:
    """The text of an /api/chat (``message.content``) or /api/generate (``response``) answer or chunk."""
    message = getattr(r, "message", None)
    return (message.content if message is not None else getattr(r, "response", "")) or ""


def _calls(r: Any) -> list[tuple[str, Any]] | None:
    """The tool calls Ollama's daemon read from the model's answer (arguments as objects, no ids), as data:
    the engine checks them against the tools and gives them ids."""
    message = getattr(r, "message", None)
    return [(c.function.name, dict(c.function.arguments)) for c in getattr(message, "tool_calls", None) or ()] or None


def ollama_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages in Ollama's shape: tool calls with arguments as objects, tool results with ``tool_name``."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or ()}
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.reasoning_content:
            d["thinking"] = m.reasoning_content
        if m.tool_calls:
            d["tool_calls"] = [{"function": {"name": c.function.name, "arguments": loads_arguments(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.role == "tool" and (name := m.name or names.get(m.tool_call_id or "")):
            d["tool_name"] = name
        out.append(d)
    return out
