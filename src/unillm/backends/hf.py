"""Hugging Face transformers in-process: a safetensors folder, its tokenizer's chat template, CPU or CUDA.

It is also the greedy reference the other backends are compared with. One model generates one request at a
time on its worker thread; tokens stream as ``generate`` produces them, and a request closed early stops at
the next token.

Registry options: ``device`` (``auto``: CUDA when torch sees a GPU, else CPU), ``dtype`` (``bfloat16``).

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                     # doctest: +SKIP
    ...     engine.chat("smollm2-hf", "What is the capital of France?", temperature=0).text
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import (
    BackendNotInstalledError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelLoadError,
    ModelUnloadedError,
    UnsupportedFeatureError,
)
from ..convert import model_folder
from ..params import fit_max_tokens
from ..registry import ModelSpec
from ._text import TokenText
from ..options import HFOptions, parse_options
from .base import (
    Capabilities,
    Generation,
    Piece,
    Request,
    ThreadedBackend,
    TokenizerText,
    request_schema,
)

try:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer
except ImportError as _exc:  # pragma: no cover
    raise BackendNotInstalledError("hf", "transformers", "hf") from _exc


class _Tokens(BaseStreamer):  # type: ignore[misc]
    """Receives each new token from ``generate`` and turns it into text with the shared TokenText."""

    def __init__(self, tokenizer: Any, out: TokenText, eos: set[int], emit: Callable[[Piece], None] | None) -> None:
        self.tokenizer, self.out, self.eos, self.emit = tokenizer, out, eos, emit
        self.prompt_seen = False
        self.ids: list[int] = []
        self.decoded = ""
        self.done = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call is the prompt
            self.prompt_seen = True
            return
        if self.done:
            return
        for tok in value.reshape(-1).tolist():
            if tok in self.eos:
                self.out.end_of_generation()
                self.done = True
                return
            self.ids.append(tok)
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if full.endswith("\ufffd"):  # half a character: count the token, wait for the rest of the text
                new = ""
            else:
                new, self.decoded = full[len(self.decoded):], full
            if self.out.add(new.encode("utf-8")):
                self.done = True
                return
            if self.emit is not None and (text := self.out.pending()):
                self.emit(Piece(text))

    def end(self) -> None:
        pass


class _Stop(transformers.StoppingCriteria):  # type: ignore[misc]
    def __init__(self, streamer: _Tokens, cancel: threading.Event) -> None:
        self.streamer, self.cancel = streamer, cancel

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        if self.cancel.is_set():
            self.streamer.out.finish = "cancelled"
            return True
        return self.streamer.done


class HFBackend(TokenizerText, ThreadedBackend):
    name = "hf"
    capabilities = Capabilities(streaming=True, json_schema=True, tools=True, embeddings=True)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.options = parse_options(HFOptions, spec)
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self._compiler: Any = None

    async def load(self) -> None:
        await self._start_worker(self._load_sync, await asyncio.to_thread(model_folder, self.spec))

    def _load_sync(self, folder: Path) -> None:
        o = self.options
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, o.dtype))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(self.spec.name, f"transformers could not load {folder}: {exc}") from exc
        self.model.to(self.device).eval()

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.options.dtype, "transformers": transformers.__version__}

    def max_concurrency(self) -> int | None:
        return 1

    async def aclose(self) -> None:
        executor = self._stop_requests()
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True)
        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _run(self, request: Request, cancel: threading.Event, emit: Callable[[Piece], None] | None) -> Generation:
        if self.model is None:
            raise ModelUnloadedError(self.spec.name)
        if request.params.extra:
            raise InvalidRequestError(f"the hf backend takes no extra options (got {sorted(request.params.extra)})")
        if request.params.presence_penalty or request.params.frequency_penalty:
            raise UnsupportedFeatureError("hf", "presence_penalty and frequency_penalty (transformers has only "
                                                "repetition_penalty, which counts differently)")
        token_ids, stops, stop_ids = self._prompt(request)
        prompt = torch.tensor([token_ids], device=self.device)
        p = request.params
        max_tokens = fit_max_tokens(self.spec.name, prompt.shape[1], self.spec.context_window, p)
        out = TokenText(request, prompt.shape[1], max_tokens, list(p.stop) + stops, stop_ids)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | stop_ids
        streamer = _Tokens(self.tokenizer, out, eos_ids, emit)
        sample = p.temperature > 0
        if p.seed is not None:
            torch.manual_seed(p.seed)
        schema = request_schema(request)
        processors = [self._grammar(schema)] if schema is not None else []
        with torch.inference_mode():
            self.model.generate(
                logits_processor=transformers.LogitsProcessorList(processors),
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
                do_sample=sample, temperature=p.temperature if sample else None, top_p=p.top_p if sample else None,
                top_k=None, streamer=streamer, stopping_criteria=transformers.StoppingCriteriaList([_Stop(streamer, cancel)]),
                pad_token_id=self.tokenizer.pad_token_id or next(iter(eos_ids), None),
            )
        result = out.result()
        if emit is not None:
            emit(out.last_piece(result))
        return result

    def _tokenizer(self) -> Any:
        if self.tokenizer is None or self.model is None:
            raise ModelUnloadedError(self.spec.name)
        return self.tokenizer

    async def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        return await self._submit(self._embed, texts, truncate)  # type: ignore[no-any-return]

    def _embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        """Mean of the last hidden states over each text's tokens, L2-normalized (on the worker thread)."""
        if self.model is None:
            raise ModelUnloadedError(self.spec.name)
        vectors, count = [], 0
        with torch.inference_mode():
            for text in texts:
                ids = self.tokenizer(text, return_tensors="pt", truncation=truncate,
                                     max_length=self.spec.context_window if truncate else None).to(self.device)
                n = int(ids["input_ids"].shape[1])
                if n > self.spec.context_window:
                    raise ContextWindowExceededError(self.spec.name, n, self.spec.context_window, embedding=True)
                hidden = self.model.base_model(**ids).last_hidden_state[0].float()
                v = hidden.mean(dim=0)
                vectors.append((v / v.norm()).tolist())
                count += n
        return vectors, count

    def _grammar(self, schema: dict[str, Any]) -> Any:
        """An xgrammar logits processor that keeps the answer inside ``schema`` (on the worker thread)."""
        try:
            import xgrammar
            from xgrammar.contrib.hf import LogitsProcessor
        except ImportError as exc:
            raise BackendNotInstalledError("hf", "xgrammar", "hf", self.spec.name) from exc
        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info)
        try:
            compiled = self._compiler.compile_json_schema(json.dumps(schema))
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError for what it cannot compile
            raise InvalidRequestError(f"xgrammar cannot compile this JSON schema: {exc}") from exc
        return LogitsProcessor(compiled)

    async def _start(
        self, request: Request, cancel: threading.Event, emit: Callable[[Piece], None] | None
    ) -> asyncio.Future[Generation]:
        return self._submit(self._run, request, cancel, emit)
