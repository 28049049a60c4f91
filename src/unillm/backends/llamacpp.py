"""GGUF models in-process with llama-cpp-python.

The chat template stored in the GGUF renders the prompt; the prompt is tokenized and checked against
the context window before anything is generated. One ``Llama`` object is not thread-safe, so each model
has one worker thread and requests to it run one after another; llama.cpp releases the GIL while it
computes, so other models and the caller's threads keep running.

Registry options (``options:`` of an entry): ``n_gpu_layers`` (``auto``: all layers when this build can
offload to a GPU, else none), ``n_threads`` / ``n_threads_batch`` (default: ``UNILLM_N_THREADS`` or half
the CPUs), ``n_batch``, ``flash_attn``, ``use_mmap``, ``chat_template`` (override the GGUF's), ``parallel``
(sequence slots decoded together by continuous batching; with more than one, threads default to all CPUs),
``cpu_weights`` (``q8_0``: on the CPU, run a Q8_0 copy of the file's weights, made once into the cache).

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                     # doctest: +SKIP
    ...     engine.chat("smollm2", "Name a colour.", max_tokens=8).text
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import (
    UnsupportedFeatureError,
    BackendNotInstalledError,
    ContextWindowExceededError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelUnloadedError,
)
from ..families import Family, reasoning_grammar, thinking
from ..completions import FimTokens, check_ids, family_tokens, fim_tokens, prompt_ids, tokens_of
from ..params import fit_max_tokens
from ..registry import resolve_file
from ..templates import bounded
from ..limits import limit, over
from ..cache import copy_path, prune, record_source
from ..system import available_memory_bytes, cpu_count, llamacpp_threads
from ._text import TokenText
from .llamacpp_batch import Batcher, SeqJob, check_batchable
from ..options import LlamaCppOptions, parse_options
from .base import (
    Capabilities,
    Generation,
    Piece,
    Request,
    ThreadedBackend,
    chat_inputs,
    think_inputs,
    request_schema,
)

try:
    import llama_cpp
    import numpy as np
    from llama_cpp import llama_chat_format
    from llama_cpp._logger import llama_log_callback as _llama_log  # the callback it sets on import
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise BackendNotInstalledError("llamacpp", "llama-cpp-python", "llamacpp") from _exc


class ExtraSampling(BaseModel):
    """Sampling options a call may pass through ``extra=``, with llama.cpp's chat defaults. Each value is
    checked here, on the caller's side: a bad one must never reach the batcher's thread."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)

    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, ge=0.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    tfs_z: float = Field(1.0, gt=0.0, le=1.0)
    mirostat_mode: int = Field(0, ge=0, le=2)
    mirostat_tau: float = Field(5.0, gt=0.0)
    mirostat_eta: float = Field(0.1, gt=0.0)
    #: Tokens the repeat/frequency/presence penalties look back over (Ollama's repeat_last_n: 0 off, -1 the
    #: whole context).
    repeat_last_n: int = Field(64, ge=-1)
    #: Editors' limits (llama.cpp server's): end at a line indented less than this (after the first line)...
    n_indent: int = Field(0, ge=0)
    #: ...or at a newline once generating has taken this long (0: off).
    t_max_predict_ms: int = Field(0, ge=0)
    #: llama.cpp's infill sampler (for fill-in-the-middle: it merges candidates that share a prefix and
    #: prefers the end when that is likely). Parallel sequences (options.parallel > 1) only.
    infill: bool = False
    grammar: Any = None
    logits_processor: Any = None

    @field_validator("min_p", "typical_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "tfs_z",
                     "mirostat_tau", "mirostat_eta", mode="before")
    @classmethod
    def _ints_are_floats(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def extra_sampling(extra: dict[str, Any]) -> dict[str, Any]:
    """The call's ``extra`` options checked and filled with defaults; InvalidRequestError names the key."""
    try:
        return dict(ExtraSampling.model_validate(extra))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            unknown = sorted(set(extra) - set(ExtraSampling.model_fields))
            raise InvalidRequestError(
                f"unknown extra option(s) {unknown} for the llamacpp backend; known: {', '.join(sorted(ExtraSampling.model_fields))}"
            ) from None
        raise InvalidRequestError(f"extra.{key}={extra.get(key)!r}: {err['msg']}") from None


def schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF text for a JSON schema, by llama-cpp-python's own converter."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions for what it cannot express
        raise InvalidRequestError(f"llama.cpp cannot turn this JSON schema into a grammar: {type(exc).__name__}: {exc}") from exc


def check_grammar_bounds(text: str, what: str) -> None:
    """Refuse a GBNF grammar over ``UNILLM_MAX_GRAMMAR_BYTES`` or nested deeper than
    ``UNILLM_MAX_GRAMMAR_NESTING`` (llama.cpp's parser recurses on each parenthesis and crashed the process on
    100,000 of them)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what} is not valid Unicode text (a lone surrogate at position {exc.start})") from None
    if size > limit("grammar_bytes"):
        raise InvalidRequestError(over("grammar_bytes", f"{what} has {size} bytes"))
    depth = deepest = 0
    quote: str | None = None
    i = 0
    while i < len(text):
        c = text[i]
        if quote is not None:  # inside "..." or [...]: parentheses are characters
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c == "#":
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl
        elif c in "\"[":
            quote = "\"" if c == "\"" else "]"
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    if deepest > limit("grammar_nesting"):
        raise InvalidRequestError(over("grammar_nesting", f"{what} nests parentheses {deepest} deep"))


def grammar_sampler(llm: Any, text: str, what: str = "extra grammar") -> Any:
    """llama.cpp's grammar sampler for GBNF ``text`` (the caller frees it). llama-cpp-python hands a NULL
    sampler to llama_sampler_chain_add when a grammar does not parse, which crashes the process: a NULL here
    is an InvalidRequestError instead."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidRequestError(f"{what} is not valid GBNF, or is beyond what llama.cpp accepts (it could not parse it)")
    return sampler


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU (CUDA, Metal, Vulkan...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


_FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}

#: llama.cpp lines that are logged as errors and are not: a GGUF that names no pooling of its own (SmolLM2),
#: given the one its registry entry chooses for embeddings.
_NOT_ERRORS = (b"model default pooling_type is [-1], but",)


@llama_cpp.llama_log_callback
def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama-cpp-python's log callback (what verbose=False prints: errors), less :data:`_NOT_ERRORS`."""
    if not any(line in text for line in _NOT_ERRORS):
        _llama_log(level, text, user_data)


llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))


class GGUFVocab:
    """A GGUF's tokenizer (of a loaded model, or of one loaded with its vocabulary only), as
    :mod:`unillm.completions` builds prompts with it. llama.cpp's vocabulary is read-only: any thread may use it."""

    def __init__(self, model: Any) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.bos = bos if llama_cpp.llama_vocab_get_add_bos(self.vocab) and bos != -1 else None
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        raw = text.encode("utf-8")
        size = len(raw) + 8
        for _ in range(2):
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, size, False, special)
            if n >= 0:
                return list(buf[:n])
            size = -n  # the room it needs
        raise RuntimeError(f"llama_tokenize returned {n}")

    def text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")


def gguf_fim(vocab: GGUFVocab) -> FimTokens | None:
    """The FIM tokens a GGUF names (``tokenizer.ggml.fim_*_token_id``, or what llama.cpp's loader recognised
    by their text), else those of a known family that its vocabulary has; None when it has none."""
    v = vocab.vocab
    pre, suf, mid = (f(v) for f in (llama_cpp.llama_vocab_fim_pre, llama_cpp.llama_vocab_fim_suf, llama_cpp.llama_vocab_fim_mid))
    if -1 in (pre, suf, mid):
        return family_tokens(vocab)
    rep, sep, pad = (f(v) for f in (llama_cpp.llama_vocab_fim_rep, llama_cpp.llama_vocab_fim_sep, llama_cpp.llama_vocab_fim_pad))
    return FimTokens((pre,), (suf,), (mid,), "psm", (rep,) if rep != -1 else None, (sep,) if sep != -1 else None,
                     frozenset(t for t in (rep, sep, pad) if t != -1), source="gguf",
                     names=(vocab.text(pre), vocab.text(suf), vocab.text(mid)))


@contextlib.contextmanager
def vocab_only(path: str) -> Iterator[tuple[Any, GGUFVocab]]:
    """A GGUF loaded with its vocabulary only (no weights, no context): the model pointer and its vocabulary."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # what Llama(verbose=False) sets
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise ValueError(f"{path} is not a GGUF llama.cpp can read")
    try:
        yield model, GGUFVocab(model)
    finally:
        llama_cpp.llama_model_free(model)


def gguf_meta(path: str, *keys: str) -> dict[str, str]:
    """Metadata values of a GGUF (those of ``keys`` that it has), read with the vocabulary only (no weights)."""
    with vocab_only(path) as (model, _):
        out = {}
        buf = ctypes.create_string_buffer(256)
        for key in keys:
            if llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) > 0:
                out[key] = buf.value.decode("utf-8", errors="replace")
        return out


@functools.lru_cache(maxsize=64)
def gguf_facts(path: str, mtime: float = 0.0) -> dict[str, Any]:
    """What a GGUF says of itself without its weights: ``architecture``, ``context_length`` (trained),
    ``file_type`` and ``fim`` (its FIM markers' texts, None without). ``mtime`` keys the cache."""
    arch = gguf_meta(path, "general.architecture").get("general.architecture", "")
    meta = gguf_meta(path, f"{arch}.context_length", "general.file_type")
    with vocab_only(path) as (_, vocab):
        fim = gguf_fim(vocab)
    return {"architecture": arch, "context_length": int(meta.get(f"{arch}.context_length", 0) or 0),
            "file_type": ftype_name(int(meta.get("general.file_type", -1))), "fim": fim.names if fim else None}


def file_type(path: str) -> int:
    """A GGUF's ``general.file_type`` (a llama_ftype)."""
    return int(gguf_meta(path, "general.file_type").get("general.file_type", -1))


def kv_cache_bytes(path: str, n_ctx: int) -> int | None:
    """What llama.cpp's f16 KV cache of ``n_ctx`` cells takes for this GGUF (None: the file does not say)."""
    arch = gguf_meta(path, "general.architecture").get("general.architecture")
    if arch is None:
        return None
    keys = [f"{arch}.{k}" for k in ("block_count", "embedding_length", "attention.head_count",
                                    "attention.head_count_kv", "attention.key_length", "attention.value_length")]
    meta = gguf_meta(path, *keys)
    try:
        layers, embd, heads = (int(meta[k]) for k in keys[:3])
    except (KeyError, ValueError):
        return None
    kv_heads = int(meta.get(keys[3], heads))
    k_len = int(meta.get(keys[4], embd // max(heads, 1)))
    v_len = int(meta.get(keys[5], k_len))
    return n_ctx * layers * kv_heads * (k_len + v_len) * 2


def ftype_name(ftype: int) -> str:
    name = llama_cpp.llama_ftype_name(ftype) if ftype >= 0 else None
    return name.decode() if name else "unknown type"


def gpu_layers(o: LlamaCppOptions) -> int:
    """The layers a model offloads: ``n_gpu_layers``, where ``auto`` is all of them when this build can."""
    if o.n_gpu_layers == "auto":
        return -1 if gpu_offload_supported() else 0
    return o.n_gpu_layers


def weights_file(name: str, path: str, o: LlamaCppOptions, n_gpu_layers: int) -> tuple[str, str | None]:
    """The GGUF to load for a model whose file is ``path``, and what a copy holds (None: the file itself).
    ``options.cpu_weights`` applies where no layer is offloaded."""
    if o.cpu_weights == "file" or n_gpu_layers != 0:
        return path, None
    return cpu_weights(name, path, o.cpu_weights)


def cpu_weights(name: str, path: str, target: str) -> tuple[str, str | None]:
    """The file to load for ``options.cpu_weights: target``, and what it holds (None: the file, already of
    that type). A copy is requantized once with llama.cpp's own quantizer into ``$UNILLM_CACHE/gguf``, named
    after the source's content (see :mod:`unillm.cache`), and written under a temporary name that is renamed
    when complete."""
    try:
        source = file_type(path)
    except ValueError as exc:
        raise ModelLoadError(name, str(exc)) from exc
    want = _FTYPES[target]
    if source == want:
        return path, None
    described = f"{ftype_name(want)} copy of the file's {ftype_name(source)} (options.cpu_weights)"
    try:
        out = copy_path(path, target)  # named by the source's content: one copy however many places hold it
    except OSError as exc:
        raise ModelLoadError(name, f"cannot read {path}: {exc}") from exc
    if out.is_file():
        record_source(out, path)
        return str(out), described
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = want, True, cpu_count()
        rc = llama_cpp.llama_model_quantize(path.encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise OSError(f"llama.cpp's quantizer returned {rc}")
        os.replace(tmp, out)  # atomic: a half-written copy is never taken for a finished one
        record_source(out, path)
        prune()  # the copies whose sources are gone (another environment's, removed since)
    except OSError as exc:
        raise ModelLoadError(
            name, f"could not make the {ftype_name(want)} copy of {path} in {out.parent}: {exc} "
            "(set UNILLM_CACHE to a writable folder, or options.cpu_weights: file)",
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return str(out), described


def on_a_passing_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on a thread that ends with the call. llama.cpp computes with OpenMP, whose team
    of threads lives as long as the thread that started it; once a process holds more OpenMP threads than
    CPUs, libgomp stops spin-waiting at the barriers of every team, the batcher's too (``Engine.batch`` on 2
    CPUs: 357 tok/s before one embedding call on the model's worker thread, 266-274 after). Work that is not
    the model's main job runs here, so that its team goes with it."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unillm-llamacpp-once") as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _guarded(proc: Callable[[Any, Any], Any], failures: list[BaseException]) -> Callable[[Any, Any], Any]:
    """Wrap a user logits processor: llama-cpp-python calls it from a ctypes callback, where an
    exception would be printed and ignored. Record it instead, and the token loop fails the request."""

    def call(input_ids: Any, scores: Any) -> Any:
        if failures:
            return scores
        try:
            return proc(input_ids, scores)
        except Exception as exc:  # noqa: BLE001 - re-raised by the token loop
            failures.append(exc)
            return scores

    return call


class LlamaCppBackend(ThreadedBackend):
    name = "llamacpp"
    capabilities = Capabilities(streaming=True, json_schema=True, tools=True, embeddings=True, logprobs=True)
    reasons_before_json = True

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.options = parse_options(LlamaCppOptions, spec)
        self._llm: Any = None
        self._formatter: Any = None
        self._template: str | None = None
        self._family: tuple[str | None, Family] | None = None
        self._vocab: GGUFVocab | None = None
        self._native_fim: FimTokens | None = None
        self._info: dict[str, Any] = {}
        self._batcher: Batcher | None = None
        self._embedder: Any = None
        self._embed_lock = asyncio.Lock()

    # -- load / close -------------------------------------------------------------------------------

    async def load(self) -> None:
        await self._start_worker(self._load_sync, str(resolve_file(self.spec)))

    def _load_sync(self, path: str) -> None:
        o = self.options
        if o.kv_cells is not None and o.kv_cells < self.spec.context_window:
            raise ModelLoadError(self.spec.name, f"options.kv_cells {o.kv_cells} is smaller than its context_window "
                                 f"{self.spec.context_window}: one request could not fit")
        n_gpu_layers = gpu_layers(o)
        # A batching context serves many sequences at once, as batch jobs that own the machine do: all CPUs,
        # tuned down while another process takes one. One sequence at a time: half of them (two spinning
        # threads on two CPUs stall, see README). options.n_threads or UNILLM_N_THREADS, when set, rule.
        threads, why, tune = llamacpp_threads(o.n_threads, o.parallel)
        file = path
        path, weights = weights_file(self.spec.name, file, o, n_gpu_layers)
        self._check_memory(path, n_gpu_layers)
        try:
            llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=self.spec.context_window,
                n_gpu_layers=n_gpu_layers,
                n_threads=threads,
                n_threads_batch=o.n_threads_batch or threads,
                n_batch=o.n_batch,
                flash_attn=o.flash_attn,
                use_mmap=o.use_mmap,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(self.spec.name, f"llama.cpp could not load {path}: {exc}") from exc
        # A base model (no chat template) completes text; chat asks for options.chat_template.
        template = o.chat_template or llm.metadata.get("tokenizer.chat_template")
        self._template = template
        eos, bos = llm.token_eos(), llm.token_bos()
        self._formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        ) if template else None
        self._vocab = GGUFVocab(llm.model)
        self._native_fim = gguf_fim(self._vocab)
        if o.parallel > 1:
            try:
                self._batcher = Batcher(
                    llm, self.spec.name, o.parallel, self.spec.context_window, threads, o.n_batch, o.flash_attn,
                    o.kv_unified, o.prompt_cache, tune_threads=tune, kv_cells=o.kv_cells,
                )
            except BaseException:
                llm.close()
                raise
        self._llm = llm
        self._info = {
            "parallel": o.parallel,
            "path": path,
            "file": file,
            "weights": weights or f"{ftype_name(int(llm.metadata.get('general.file_type', -1)))}, as in the file",
            "n_ctx": llm.n_ctx(),
            "n_ctx_train": int(llama_cpp.llama_model_n_ctx_train(llm.model)),
            "n_gpu_layers": n_gpu_layers,
            "gpu_offload_supported": gpu_offload_supported(),
            "n_threads": threads,
            "threads": why,
            "llama_cpp_python": llama_cpp.__version__,
        }

    def _check_memory(self, path: str, n_gpu_layers: int) -> None:
        """Refuse a load whose KV cache alone cannot fit in the memory available (a context_window of 10**9
        allocated 15 GB before llama.cpp gave up), before anything is allocated."""
        if n_gpu_layers != 0:
            return  # the cache goes where the layers go: the GPU's own check applies
        o = self.options
        pool = (o.kv_cells or o.parallel * self.spec.context_window) if o.parallel > 1 else 0
        cells = self.spec.context_window + pool
        need, free = kv_cache_bytes(path, cells), available_memory_bytes()
        if need is not None and free is not None and need > free:
            raise ModelLoadError(
                self.spec.name, f"its KV cache for context_window {self.spec.context_window} x "
                f"{max(self.options.parallel, 1)} slot(s) (+1 for the single-sequence context) needs "
                f"{need / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB of memory is available: lower context_window "
                f"or options.parallel in {self.spec.config_file or 'the registry'}",
            )

    def info(self) -> dict[str, Any]:
        out = dict(self._info)
        if self._batcher is not None:  # the count decoding uses now (the tuner may have changed it)
            out["n_threads_now"] = self._batcher.n_threads
        return out

    async def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        # Not on the model's worker thread, which tokenizes every chat request: one embed() of 200 texts held
        # chat on this model for 43 s. Embeddings have a context of their own, used one call at a time.
        async with self._embed_lock:
            if self._executor is None:
                raise ModelUnloadedError(self.spec.name)
            return await asyncio.to_thread(self._embed, texts, truncate)  # type: ignore[no-any-return]

    def _embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        """Off the loop: a second context of the same GGUF in embedding mode (mean pooling by default,
        ``options.pooling``), made on the first call; it computes on a passing thread."""
        if self._embedder is None:
            o = self.options
            pooling = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
                       "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}[o.pooling]
            self._embedder = llama_cpp.Llama(
                model_path=self._info["path"], embedding=True, pooling_type=pooling, n_ctx=self.spec.context_window,
                n_batch=self.spec.context_window, n_ubatch=self.spec.context_window, n_threads=self._info["n_threads"],
                n_gpu_layers=self._info["n_gpu_layers"], verbose=False,
            )
        emb = self._embedder
        for text in texts if not truncate else ():
            n = len(emb.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n > self.spec.context_window:
                raise ContextWindowExceededError(self.spec.name, n, self.spec.context_window, embedding=True)
        # truncate cuts each text to n_batch tokens, which is the context window here
        vectors, count = on_a_passing_thread(emb.embed, texts, normalize=True, truncate=truncate, return_count=True)
        return [list(map(float, v)) for v in vectors], int(count)

    def max_concurrency(self) -> int | None:
        # Keep every slot busy with one request queued behind it; more would only tokenize early.
        return 2 * self.options.parallel if self._batcher is not None else 1

    async def aclose(self) -> None:
        executor = self._stop_requests()
        if executor is None:
            return
        llm, self._llm = self._llm, None
        embedder, self._embedder = self._embedder, None
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await asyncio.to_thread(batcher.close)
        async with self._embed_lock:  # after the embedding in flight, if any
            pass
        for model in (llm, embedder):
            if model is not None:
                await asyncio.get_running_loop().run_in_executor(executor, model.close)
        await asyncio.to_thread(executor.shutdown, True)

    # -- generation ---------------------------------------------------------------------------------

    def _sampling(self, llm: Any, request: Request, failures: list[BaseException]) -> dict[str, Any]:
        """The call's sampling options for llama.cpp; a grammar's size and nesting are checked, and
        ``grammar_text`` holds its GBNF (whoever makes its sampler learns whether it parses)."""
        kw = extra_sampling(request.params.extra)
        if kw["repeat_last_n"] == -1:
            kw["repeat_last_n"] = self.spec.context_window
        p = request.params
        for name in ("presence_penalty", "frequency_penalty"):  # the call's own parameter over extra's
            if getattr(p, name):
                kw[name] = getattr(p, name)
        schema = request_schema(request)
        what = "extra grammar"
        if schema is not None:
            if kw["grammar"] is not None:
                raise InvalidRequestError("extra grammar and a JSON schema (response_format or a required tool call) "
                                          "both constrain the answer: give one")
            gbnf, what = schema_grammar(schema), "the grammar built from the JSON schema"
            if thinking(family := self.family(), p.think):  # the model reasons first, as its template expects
                gbnf = reasoning_grammar(family, gbnf)
            kw["grammar"] = gbnf
        kw["grammar_text"] = None
        if kw["grammar"] is not None:
            grammar = kw["grammar"]
            text = grammar if isinstance(grammar, str) else getattr(grammar, "_grammar", None)
            if not isinstance(text, str):
                raise InvalidRequestError("extra grammar must be GBNF text or a llama_cpp.LlamaGrammar")
            check_grammar_bounds(text, what)
            kw["grammar"], kw["grammar_text"] = llama_cpp.LlamaGrammar.from_string(text, verbose=False), (text, what)
        if kw["logits_processor"] is not None:
            procs = kw["logits_processor"]
            procs = list(procs) if isinstance(procs, (list, tuple)) else [procs]
            kw["logits_processor"] = llama_cpp.LogitsProcessorList([_guarded(p, failures) for p in procs])
        return kw

    def fim(self) -> FimTokens | None:
        """The model's FIM format: its registry ``fim:`` block, else the GGUF's tokens (None: neither)."""
        if self._vocab is None:
            raise ModelUnloadedError(self.spec.name)
        if self.spec.fim is None and self._native_fim is None:
            return None
        return fim_tokens(self.spec.name, self.name, self._vocab, self._native_fim, self.spec.fim)

    def _render(self, request: Request) -> Any:
        """The chat template's rendering of the request (``prompt``, ``stop``, ``added_special``)."""
        if self._formatter is None:
            raise UnsupportedFeatureError(self.name, f"chat with model {self.spec.name!r}: its GGUF has no chat template "
                                          "(a base model: use Engine.complete, or set options.chat_template)")
        family = self.family()
        messages, tools = chat_inputs(request, self._template, family)
        kwargs, after = think_inputs(request, family, self._template)
        with bounded(self.spec.name):
            fmt = self._formatter(messages=messages, tools=tools, **kwargs)
        fmt.prompt += after
        return fmt

    def chat_template(self) -> str | None:
        return self._template

    def family(self) -> Family:
        if self._family is None or self._family[0] is not self._template:
            self._family = (self._template, super().family())
        return self._family[1]

    def _chat_tokens(self, llm: Any, request: Request) -> tuple[list[int], list[str]]:
        """The chat prompt's tokens and the template's stop strings."""
        fmt = self._render(request)
        tokens = llm.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True)
        return tokens, [s for s in (fmt.stop or []) if s]

    async def chat_prompt(self, request: Request) -> str:
        self._model()
        return str((await self._submit(self._render, request)).prompt)

    def _tokens(self, llm: Any, request: Request) -> tuple[list[int], int, list[str], frozenset[int]]:
        """Prompt tokens, the max_tokens that fit, the stop strings and the stop tokens besides the model's
        end tokens (runs on the worker)."""
        stop_ids: frozenset[int] = frozenset()
        if request.prompt is None:
            tokens, more = self._chat_tokens(llm, request)
        else:
            vocab = self._vocab
            assert vocab is not None  # loaded: _model() answered
            fim = fim_tokens(self.spec.name, self.name, vocab, self._native_fim, self.spec.fim) if request.prompt.fim else None
            tokens = prompt_ids(vocab, fim, request.prompt, self.spec.name, self.name)
            more, stop_ids = (list(fim.stop), fim.stop_ids) if fim is not None else ([], frozenset())
        max_tokens = fit_max_tokens(self.spec.name, len(tokens), self.spec.context_window, request.params)
        return tokens, max_tokens, list(request.params.stop) + more, stop_ids

    async def tokenize(self, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
        vocab = self._vocab
        if vocab is None:
            raise ModelUnloadedError(self.spec.name)
        return await self._submit(tokens_of, vocab, text, special, add_bos)  # type: ignore[no-any-return]

    async def detokenize(self, ids: list[int]) -> str:
        llm = self._model()
        raw = await self._submit(llm.detokenize, check_ids(ids, llm.n_vocab(), self.spec.name))
        return bytes(raw).decode("utf-8", errors="replace")

    async def chat_tokens(self, request: Request) -> int:
        return len((await self._submit(lambda: self._chat_tokens(self._model(), request)))[0])

    def _model(self) -> Any:
        """The loaded Llama, taken once per request: unload may clear it from another thread meanwhile."""
        llm = self._llm
        if llm is None:
            raise ModelUnloadedError(self.spec.name)
        return llm

    def _run(self, request: Request, cancel: threading.Event, emit: Callable[[Piece], None] | None) -> Generation:
        """The token loop, on the model's worker thread. ``emit`` receives pieces when streaming."""
        llm = self._model()
        failures: list[BaseException] = []
        kw = self._sampling(llm, request, failures)
        if (grammar := kw.pop("grammar_text")) is not None:  # Llama makes its own sampler: parse it here first
            llama_cpp.llama_sampler_free(grammar_sampler(llm, *grammar))
        llm.last_n_tokens_size = kw.pop("repeat_last_n")  # read by generate's sampler; one request at a time here
        if kw.pop("infill"):
            raise UnsupportedFeatureError(self.name, f"extra infill (the infill sampler) with {self.spec.name!r}: it is "
                                          "in the parallel sequences' sampler chain only (options.parallel > 1)")
        limits = kw.pop("n_indent"), kw.pop("t_max_predict_ms")
        tokens, max_tokens, stops, stop_ids = self._tokens(llm, request)
        p = request.params
        llm.set_seed(p.seed if p.seed is not None else random.randint(0, 2**31 - 1))
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        out = TokenText(request, len(tokens), max_tokens, stops, stop_ids, *limits)
        gen: Generator[int, Any, None] = llm.generate(tokens, temp=p.temperature, top_p=p.top_p, reset=True, **kw)
        try:
            for token in gen:
                if failures:
                    raise GenerationError(self.spec.name, f"a logits processor raised {failures[0]!r}") from failures[0]
                if llama_cpp.llama_vocab_is_eog(vocab, token) or token in out.stop_ids:
                    out.end_of_generation()
                    break
                if out.logprobs is not None:  # the logits of the step that chose this token (the context's last)
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                    out.add_logprobs(logits, token, lambda t: bytes(llm.detokenize([t])))
                if out.add(llm.detokenize([token])):
                    break
                if cancel.is_set():
                    out.finish = "cancelled"
                    break
                if emit is not None and (text := out.pending()):
                    emit(Piece(text, logprobs=out.take_logprobs()))
        finally:
            gen.close()
        result = out.result()
        if emit is not None:
            emit(out.last_piece(result))
        return result

    def _job(self, request: Request, cancel: threading.Event, emit: Callable[[Piece], None] | None) -> SeqJob:
        """Tokenize and check a request for the batcher (on the worker thread)."""
        llm = self._model()
        sampling = self._sampling(llm, request, [])
        check_batchable(self.spec.name, request.params.extra)
        tokens, max_tokens, stops, stop_ids = self._tokens(llm, request)
        text = sampling.pop("grammar_text")
        # The grammar's sampler is made here, not on the batcher's thread: every sequence waits for that one.
        grammar = grammar_sampler(llm, *text) if text is not None else None
        out = TokenText(request, len(tokens), max_tokens, stops, stop_ids, sampling.pop("n_indent"), sampling.pop("t_max_predict_ms"))
        return SeqJob(request, tokens, out, sampling, emit, cancel, grammar)

    async def _start(
        self, request: Request, cancel: threading.Event, emit: Callable[[Piece], None] | None
    ) -> asyncio.Future[Generation]:
        """Start a request: on the single-sequence worker, or as a sequence of the batcher."""
        if self._batcher is None:
            return self._submit(self._run, request, cancel, emit)
        job: SeqJob = await self._submit(self._job, request, cancel, emit)
        try:
            if self._batcher is None:
                raise ModelUnloadedError(self.spec.name)
            self._batcher.submit(job)
        except ModelUnloadedError:  # unloaded meanwhile: the batcher never owned the job's grammar
            if job.grammar is not None:
                llama_cpp.llama_sampler_free(job.grammar)
            raise
        return asyncio.wrap_future(job.future)
