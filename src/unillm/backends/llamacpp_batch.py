"""Continuous batching for GGUF models: one llama.cpp context with several sequence slots.

One thread owns the context. Each step it puts every active sequence into one ``llama_decode`` (the next
token of those generating, a chunk of the prompt of those just admitted), samples each sequence with its own
sampler chain, and admits waiting requests into slots as others finish. Async callers, ``Engine.batch`` and
threads all share it. Sampling mirrors llama-cpp-python's ``Llama`` (penalties, grammar, top-k, typical,
top-p, min-p, temperature, seeded dist; greedy at temperature 0). ``logits_processor`` and mirostat need the
single-sequence path (``parallel: 1``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import math
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from ..errors import GenerationError, ModelLoadError, ModelUnloadedError, UnsupportedFeatureError
from ._text import TokenText
from .base import Generation, Piece, Request

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


@dataclass
class SeqJob:
    """One request for the batcher; ``future`` gets its Generation or its exception."""

    request: Request
    tokens: list[int]
    text: TokenText
    sampling: dict[str, Any]
    emit: Callable[[Piece], None] | None
    cancel: threading.Event = field(default_factory=threading.Event)
    #: The grammar's llama.cpp sampler, made on the model's worker thread (None: no grammar); the batcher
    #: owns it once the job is submitted, and frees it.
    grammar: Any = None
    future: concurrent.futures.Future[Generation] = field(default_factory=concurrent.futures.Future)


@dataclass
class _Slot:
    seq: int
    job: SeqJob
    sampler: Any
    #: A grammar (JSON schema, GBNF) kept out of the chain: checked on the chain's pick, applied only if it fails.
    grammar: Any = None
    prompt_left: list[int] = field(default_factory=list)
    last_token: int = -1


def unsupported_in_batch(extra: dict[str, Any]) -> str | None:
    if extra.get("logits_processor") is not None:
        return "logits_processor"
    if extra.get("mirostat_mode"):
        return "mirostat_mode"
    return None


class ThreadTuner:
    """Picks, while a batch runs, the faster of two thread counts for its decoding steps.

    With a thread per CPU, llama.cpp's threads wait for each other at every step; when another process takes
    a CPU, each wait costs one of its time slices, and a 16-sequence batch on 2 CPUs fell from 121-135 to 37-44
    tok/s, while one thread went from 83 to 75 (``benchmarks/threads_under_load.py``). Neither count is the
    faster on every machine at every moment, so the batcher measures: it decodes with the current count, and
    every ``period`` decoding steps tries the other for ``probe`` steps, keeping whichever took less time per
    token (by the median of its steps; it switches only for a gain of over ``margin``).

    Example:
        >>> t = ThreadTuner((2, 1), period=4, probe=2, first=4)
        >>> [t.step(16, 0.1) for _ in range(4)]          # 2 threads: 6.25 ms a token, then a probe of 1
        [2, 2, 2, 1]
        >>> [t.step(16, 0.05) for _ in range(2)]         # 1 thread is twice as fast now: it stays
        [1, 1]
    """

    def __init__(self, counts: tuple[int, int], period: int = 32, probe: int = 4, margin: float = 0.1,
                 first: int | None = None) -> None:
        self.counts = counts
        self.current = 0  # index into counts of the count in use
        self.period, self.probe, self.margin = period, probe, margin
        self._times: dict[int, list[float]] = {0: [], 1: []}
        self._probing = False
        self._left = first if first is not None else probe  # the first probe comes early: a batch can be short

    @property
    def threads(self) -> int:
        return self.counts[self.current ^ 1 if self._probing else self.current]

    def step(self, tokens: int, seconds: float) -> int:
        """Record a decoding step (``tokens`` in ``seconds``); the thread count for the next step."""
        which = self.current ^ 1 if self._probing else self.current
        times = self._times[which]
        times.append(seconds / max(tokens, 1))
        del times[: -self.probe]
        self._left -= 1
        if self._left > 0:
            return self.threads
        if self._probing:
            mine, other = _median(self._times[self.current]), _median(self._times[self.current ^ 1])
            if other < mine * (1 - self.margin):
                self.current ^= 1
            self._probing, self._left = False, self.period
        else:
            self._probing, self._left = True, self.probe
            self._times[self.current ^ 1] = []
        return self.threads


def _median(xs: list[float]) -> float:
    return statistics.median_high(xs) if xs else math.inf


class Batcher:
    """Owns a llama.cpp context with ``n_seq`` slots of ``n_ctx_seq`` tokens each, and its thread. With
    ``tune_threads``, decoding steps pick between ``n_threads`` and one thread as :class:`ThreadTuner` finds
    faster."""

    def __init__(
        self, llm: Any, name: str, n_seq: int, n_ctx_seq: int, n_threads: int, n_batch: int, flash_attn: bool = False,
        kv_unified: bool = False, prompt_cache: bool = True, tune_threads: bool = False, kv_cells: int | None = None,
    ) -> None:
        self.llm = llm
        self.name = name
        self.n_seq = n_seq
        self.n_batch = max(n_batch, n_seq)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_cells or n_seq * n_ctx_seq
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = 1 if flash_attn else 0  # explicit, as Llama does: same numbers as the single path
        params.no_perf = True
        params.kv_unified = kv_unified
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise ModelLoadError(name, f"llama.cpp could not create a context with {n_seq} sequences")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._cand = (llama_cpp.llama_token_data * self.n_vocab)()  # candidates, for sequences with a grammar
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self.jobs: queue.SimpleQueue[SeqJob | None] = queue.SimpleQueue()
        self.slots: list[_Slot | None] = [None] * n_seq
        #: The tokens in each sequence's cache, in position order: the next token's position is the length.
        #: A sequence keeps them when its request ends (prompt caching, as llama.cpp's server does per slot): a
        #: new prompt goes to the free sequence that shares its longest beginning (the chat template's system
        #: block, an earlier turn) and only the rest is evaluated.
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]
        #: A shared pool smaller than every slot's window: the cells each running request may fill (its prompt
        #: and max_tokens), admitted only while they fit (see :meth:`_fits`).
        self.pool = kv_cells
        self.reserved = [0] * n_seq
        self.prompt_cache = prompt_cache
        self.n_threads = n_threads
        self.tuner = ThreadTuner((n_threads, 1)) if tune_threads and n_threads > 1 else None
        self.waiting: list[SeqJob] = []
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"unillm-batch-{name}", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------------

    def submit(self, job: SeqJob) -> None:
        if self._closing:
            raise ModelUnloadedError(self.name)
        self.jobs.put(job)

    def close(self) -> None:
        """Cancel what is running, stop the thread, free the context."""
        if self._closing:
            return
        self._closing = True
        self.jobs.put(None)
        self._thread.join()
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception as exc:  # noqa: BLE001 - a defect here must not leave every request waiting for ever
                for job in [s.job for s in self.slots if s is not None] + self.waiting:
                    _settle(job.future, exc=GenerationError(self.name, f"{type(exc).__name__}: {exc}"))
                for slot in self.slots:
                    if slot is not None:
                        self._release(slot, keep_cache=False)
                for job in self.waiting:
                    _free(job.grammar)
                self.waiting.clear()

    def _turn(self) -> bool:
        """One round: take new jobs, admit what fits, decode one step. False once closed."""
        busy = any(self.slots) or self.waiting
        try:
            job = self.jobs.get(block=not busy)
            while True:
                if job is None:
                    self._shutdown()
                    return False
                self.waiting.append(job)
                job = self.jobs.get_nowait()
        except queue.Empty:
            pass
        self._admit()
        if any(self.slots):
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - fail what was in the batch, keep serving
                for slot in self.slots:
                    if slot is not None:
                        self._fail(slot, GenerationError(self.name, f"{type(exc).__name__}: {exc}"))
        return True

    def _shutdown(self) -> None:
        for slot in self.slots:
            if slot is not None:
                slot.job.cancel.set()
                slot.job.text.finish = "cancelled"
                self._finish(slot)
        for job in self.waiting:
            _free(job.grammar)
            _settle(job.future, exc=ModelUnloadedError(self.name))  # a cancelled caller's future is already done
        self.waiting.clear()

    def _admit(self) -> None:
        for slot in self.slots if self.waiting else ():  # a slot whose caller has gone is free for the next
            if slot is not None and slot.job.cancel.is_set():
                slot.job.text.finish = "cancelled"
                self._finish(slot)
        while self.waiting and None in self.slots:
            job = self.waiting[0]
            if not job.cancel.is_set() and not self._fits(job):
                return  # it waits for running requests to end (the first in line goes first)
            self.waiting.pop(0)
            try:
                if job.cancel.is_set():
                    _free(job.grammar)
                    job.text.finish = "cancelled"
                    self._resolve(job)
                    continue
                sampler, grammar = self._sampler(job), job.grammar
            except Exception as exc:  # noqa: BLE001 - this request alone fails; the thread goes on
                _free(job.grammar)
                _settle(job.future, exc=GenerationError(self.name, f"{type(exc).__name__}: {exc}"))
                continue
            seq, keep = self._reuse(job.tokens)
            job.text.cached_tokens = keep
            self.slots[seq] = _Slot(seq, job, sampler, grammar, prompt_left=job.tokens[keep:])
            if self.pool is not None:
                self.reserved[seq] = len(job.tokens) + job.text.max_tokens
                self._make_room()

    def _fits(self, job: SeqJob) -> bool:
        """Whether a request's prompt and max_tokens fit in the pool beside those of the running ones."""
        if self.pool is None:
            return True
        running = sum(self.reserved[i] for i, s in enumerate(self.slots) if s is not None)
        return running + len(job.tokens) + job.text.max_tokens <= self.pool

    def _make_room(self) -> None:
        """Drop the cached prompts of idle slots, the largest first, until the running requests' cells fit."""
        idle = sorted((i for i, s in enumerate(self.slots) if s is None and self.cached[i]), key=lambda i: -len(self.cached[i]))
        running = sum(self.reserved[i] for i, s in enumerate(self.slots) if s is not None)
        held = sum(len(self.cached[i]) for i in idle)
        for i in idle:
            if running + held <= self.pool:  # type: ignore[operator]
                return
            held -= len(self.cached[i])
            llama_cpp.llama_memory_seq_rm(self.mem, i, -1, -1)
            self.cached[i].clear()

    def _reuse(self, tokens: list[int]) -> tuple[int, int]:
        """The free sequence whose cache shares the longest beginning with ``tokens`` (of equals, the one
        holding least, so that longer caches stay for later), and how many of its cached tokens stay: at least
        the last prompt token is evaluated again, as its logits pick the first token."""
        shared = {i: _common_prefix(self.cached[i], tokens) if self.prompt_cache else 0
                  for i, slot in enumerate(self.slots) if slot is None}
        best = max(shared, key=lambda i: (shared[i], -len(self.cached[i])))
        keep = min(shared[best], len(tokens) - 1)
        if keep <= 0 or not llama_cpp.llama_memory_seq_rm(self.mem, best, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, best, -1, -1)
            keep = 0
        del self.cached[best][keep:]
        return best, keep

    def _sampler(self, job: SeqJob) -> Any:
        """The sampler chain of a sequence (its grammar, made by the worker, is ``job.grammar``)."""
        kw, p = job.sampling, job.request.params
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        add(llama_cpp.llama_sampler_init_penalties(
            self.n_vocab, kw["repeat_last_n"], kw["repeat_penalty"], kw["frequency_penalty"], kw["presence_penalty"]))
        if p.temperature == 0.0:
            if kw["infill"]:
                add(llama_cpp.llama_sampler_init_infill(self.vocab))
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(kw["top_k"]))
            add(llama_cpp.llama_sampler_init_typical(kw["typical_p"], 1))
            add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(kw["min_p"], 1))
            if kw["infill"]:
                add(llama_cpp.llama_sampler_init_infill(self.vocab))
            add(llama_cpp.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else random.randint(0, 2**31 - 1)
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _sample(self, slot: _Slot, idx: int) -> int:
        """Sample a sequence's next token. With a grammar, as llama.cpp's own common sampler does: the chain
        picks from all the logits, the grammar checks that one token, and only when it refuses is the grammar
        applied to the whole vocabulary and the pick made again (applying it to every token of every sequence at
        every step is what made structured batches slow)."""
        if slot.grammar is None:
            return int(llama_cpp.llama_sampler_sample(slot.sampler, self.ctx, idx))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))
        cur = self._candidates(logits)
        llama_cpp.llama_sampler_apply(slot.sampler, ctypes.byref(cur))
        token = int(self._cand[cur.selected].id)
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        check = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(check))
        if math.isinf(one[0].logit):  # refused: constrain the whole vocabulary, then pick again
            cur = self._candidates(logits)
            llama_cpp.llama_sampler_apply(slot.grammar, ctypes.byref(cur))
            llama_cpp.llama_sampler_apply(slot.sampler, ctypes.byref(cur))
            token = int(self._cand[cur.selected].id)
        llama_cpp.llama_sampler_accept(slot.grammar, token)
        llama_cpp.llama_sampler_accept(slot.sampler, token)
        return token

    def _candidates(self, logits: Any) -> Any:
        """All tokens with their logits, in the buffer this batcher reuses."""
        view = np.frombuffer(self._cand, dtype=_TOKEN_DATA, count=self.n_vocab)
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        return llama_cpp.llama_token_data_array(data=self._cand, size=self.n_vocab, selected=-1, sorted=False)

    def _step(self) -> None:
        b, n, outputs = self.batch, 0, []
        for slot in self.slots:
            if slot is None:
                continue
            if slot.job.cancel.is_set():
                slot.job.text.finish = "cancelled"
                self._finish(slot)
                continue
            if slot.prompt_left:  # a prompt, in chunks that fit beside the others
                room = self.n_batch - n - sum(1 for s in self.slots if s is not None and not s.prompt_left)
                take = slot.prompt_left[: max(room, 0)]
                if not take:
                    continue
                del slot.prompt_left[: len(take)]
                cached = self.cached[slot.seq]
                for k, tok in enumerate(take):
                    last = k == len(take) - 1 and not slot.prompt_left
                    self._put(b, n, tok, len(cached), slot.seq, last)
                    cached.append(tok)
                    if last:
                        outputs.append((slot, n))
                    n += 1
            else:
                if n >= self.n_batch:
                    continue
                cached = self.cached[slot.seq]
                self._put(b, n, slot.last_token, len(cached), slot.seq, True)
                cached.append(slot.last_token)
                outputs.append((slot, n))
                n += 1
        if n == 0:
            return
        b.n_tokens = n
        decoding = len(outputs) == n  # one token per sequence: no prompt in this step (what the tuner compares)
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        if self.tuner is not None and decoding:
            threads = self.tuner.step(n, time.perf_counter() - t0)
            if threads != self.n_threads:
                llama_cpp.llama_set_n_threads(self.ctx, threads, threads)
                self.n_threads = threads
        for slot, idx in outputs:
            token = self._sample(slot, idx)
            text = slot.job.text
            if llama_cpp.llama_vocab_is_eog(self.vocab, token) or token in text.stop_ids:
                text.end_of_generation()
                self._finish(slot)
                continue
            if text.logprobs is not None:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, idx), shape=(self.n_vocab,))
                text.add_logprobs(logits, token, self._detokenize)
            if text.add(self.llm.detokenize([token])):
                self._finish(slot)
            else:
                slot.last_token = token
                if slot.job.emit is not None and (new := text.pending()):
                    slot.job.emit(Piece(new, logprobs=text.take_logprobs()))

    def _detokenize(self, token: int) -> bytes:
        return bytes(self.llm.detokenize([token]))

    @staticmethod
    def _put(b: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _release(self, slot: _Slot, keep_cache: bool = True) -> None:
        if not keep_cache:  # after a failed decode the cache's contents are not known
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            self.cached[slot.seq].clear()
        for sampler in (slot.sampler, slot.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        self.slots[slot.seq] = None
        self.reserved[slot.seq] = 0

    def _finish(self, slot: _Slot) -> None:
        self._release(slot)
        self._resolve(slot.job)

    def _resolve(self, job: SeqJob) -> None:
        if job.future.done():  # its caller was cancelled and went away
            return
        result = job.text.result()
        if job.emit is not None:
            job.emit(job.text.last_piece(result))
        _settle(job.future, result)

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        self._release(slot, keep_cache=False)
        _settle(slot.job.future, exc=exc)


def _settle(future: concurrent.futures.Future[Generation], result: Generation | None = None,
            exc: BaseException | None = None) -> None:
    """Resolve a job's future unless it is done already: its caller may cancel it from another thread at any
    moment, and resolving a cancelled future raises InvalidStateError (which killed this thread)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except concurrent.futures.InvalidStateError:
        pass


def _free(sampler: Any) -> None:
    if sampler is not None:
        llama_cpp.llama_sampler_free(sampler)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def check_batchable(name: str, extra: dict[str, Any]) -> None:
    key = unsupported_in_batch(extra)
    if key is not None:
        ollama = {"mirostat_mode": " (Ollama's options.mirostat)"}.get(key, "")
        raise UnsupportedFeatureError("llamacpp", f"extra {key!r}{ollama} with parallel sequences ({name}: options.parallel > 1; "
                                                  "use parallel: 1)")
