"""Generated tokens to text, shared by the token loops: UTF-8 split across tokens, stop strings held
back until they cannot match, token counts and timings."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from typing import Any

from ..types import Usage
from .base import Generation, Piece, Request, decode_rate


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string. Only prefixes that end
    with the text's last character are tried, so a long stop string costs a few comparisons, not one per
    character."""
    if not text:
        return 0
    last, keep = text[-1], 0
    for s in stops:
        n = min(len(s) - 1, len(text))
        while n > keep:
            i = s.rfind(last, 0, n)  # the longest prefix shorter than n that ends with the text's last character
            if i + 1 <= keep:
                break
            n = i + 1
            if text.endswith(s[:n]):
                keep = n
                break
            n -= 1
    return keep


class TokenText:
    """The answer of one sequence as its tokens arrive."""

    def __init__(self, request: Request, prompt_tokens: int, max_tokens: int, stops: list[str],
                 stop_ids: frozenset[int] = frozenset(), n_indent: int = 0, t_max_predict_ms: int = 0) -> None:
        self.request = request
        #: Tokens that end the answer besides the model's end tokens (a FIM model's file separator).
        self.stop_ids = stop_ids
        #: Editors' limits, as llama.cpp's server applies them (see :meth:`_short_line`, :meth:`add`).
        self.n_indent, self.t_max_s = n_indent, t_max_predict_ms / 1000
        self._line: int | None = None  # where the line whose indentation is not checked yet begins
        self._scan = 0
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.max_tokens = max_tokens
        self.stops = stops
        self.stop_sequence: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.n = 0
        self.first_at: float | None = None
        self.finish = "length"
        self._cut = False
        #: With logprobs: an OpenAI entry per generated token (the end token excluded), and how many went out.
        self.logprobs: list[dict[str, Any]] | None = [] if request.params.logprobs else None
        self._lp_sent = 0

    def _tick(self) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def end_of_generation(self) -> None:
        """The model produced its end token."""
        self._tick()
        self.finish = "stop"

    def add(self, piece: bytes) -> bool:
        """Append one generated token's bytes; True when the answer is complete."""
        self._tick()
        self.n += 1
        before = len(self.text)
        self.text += self._decoder.decode(piece)
        # A stop string not found before can only end in the new text: search from where it could begin.
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            at, self.stop_sequence = min(hits, key=lambda hit: hit[0])
            self.text, self.finish, self._cut = self.text[:at], "stop", True
            return True
        if self.n_indent and self._short_line():
            self._cut = True
            return True  # finish stays "length": the caller's limit
        if self.t_max_s and "\n" in self.text[before:] and time.perf_counter() - (self.first_at or 0) > self.t_max_s:
            return True
        return self.n >= self.max_tokens

    def _short_line(self) -> bool:
        """``n_indent``: after the first line, a line that begins with less indentation (spaces and tabs) than
        this ends the answer, cut before its first other character (llama.cpp server's rule: the middle of a
        block ends where the block does)."""
        t = self.text
        while True:
            if self._line is None:
                nl = t.find("\n", self._scan)
                if nl < 0:
                    self._scan = len(t)
                    return False
                self._line = nl + 1
            i = self._line
            while i < len(t) and t[i] in " \t":
                i += 1
            if i >= len(t):
                return False
            if i - self._line < self.n_indent:
                self.text = t[:i]
                return True
            self._line, self._scan = None, i

    def pending(self) -> str:
        """New text that can be streamed now (none that could still turn out to be a stop string)."""
        upto = len(self.text) - stop_holdback(self.text, self.stops)
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out

    def add_logprobs(self, logits: Any, token: int, detokenize: Callable[[int], bytes]) -> None:
        """Record the log probability of ``token`` (and the most likely alternatives) from the raw logits of
        the step that chose it (the model's distribution, before temperature and penalties)."""
        if self.logprobs is None:
            return
        import numpy as np

        x = np.asarray(logits, dtype=np.float64)
        m = x.max()
        lp = x - (m + np.log(np.exp(x - m).sum()))

        def item(t: int) -> dict[str, Any]:
            raw = detokenize(t)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(lp[t]), "bytes": list(raw)}

        entry = item(token)
        k = self.request.params.top_logprobs
        top: Any = np.argpartition(-lp, k)[:k] if k else []
        entry["top_logprobs"] = [item(int(t)) for t in sorted(top, key=lambda t: -lp[t])]
        self.logprobs.append(entry)

    def take_logprobs(self) -> list[dict[str, Any]] | None:
        """The entries not yet streamed (None without logprobs)."""
        if self.logprobs is None:
            return None
        out, self._lp_sent = self.logprobs[self._lp_sent :], len(self.logprobs)
        return out

    def result(self) -> Generation:
        if not self._cut:
            self.text += self._decoder.decode(b"", final=True)
        ttft = None if self.first_at is None else self.first_at - self.request.started
        rate = decode_rate(self.n, self.first_at, time.perf_counter())
        return Generation(self.text, self.finish, Usage(self.prompt_tokens, self.n, self.cached_tokens), ttft, rate, self.logprobs,
                          stop_sequence=self.stop_sequence)

    def last_piece(self, result: Generation) -> Piece:
        return Piece(result.text[self.sent :], result.finish_reason, result.usage, result.ttft_s, result.decode_tokens_per_s,
                     self.take_logprobs(), stop_sequence=result.stop_sequence)
