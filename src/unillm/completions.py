"""Raw and fill-in-the-middle (FIM) prompts as token ids, built the same way on every in-process backend.

A completion prompt is text that the model continues, with no chat template. With a ``suffix`` it is a FIM
prompt: the text before the cursor and the text after it, joined by the model's own FIM tokens, in
prefix-suffix-middle (``psm``) or suffix-prefix-middle (``spm``) order; the model writes what goes between.
Each part is tokenized on its own and the marker ids are put between them, so a marker is never text that the
tokenizer could split or merge with the code around it, and code that happens to contain a marker's text stays
plain text (it is tokenized without special tokens).

The markers come from the model's files (a GGUF's ``tokenizer.ggml.fim_*`` ids, or a tokenizer's special
tokens of a known family: Qwen2.5-Coder, StarCoder, DeepSeek-Coder, CodeLlama), or from the registry entry's
``fim:`` block, which overrides them or supplies them for a model whose files lack them.

Repository context (other files of the project before the prefix, llama.cpp's ``input_extra``) uses the model's
repository-name and file-separator tokens (Qwen2.5-Coder's ``<|repo_name|>`` and ``<|file_sep|>``); a model
without a file separator gets each file after a plain-text separator, as llama.cpp's server builds it.

Example:
    >>> words = {"<pre>": [1], "<suf>": [2], "<mid>": [3]}
    >>> class Toy:
    ...     bos, n_vocab = None, 256
    ...     def tokenize(self, text, special):
    ...         return words[text] if special and text in words else [ord(c) for c in text]
    >>> fim = fim_tokens("toy", "llamacpp", Toy(), None, FimBlock(prefix="<pre>", suffix="<suf>", middle="<mid>"))
    >>> prompt_ids(Toy(), fim, Prompt("ab", suffix="c"), "toy", "llamacpp")
    [1, 97, 98, 2, 99, 3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequestError, UnsupportedFeatureError


class FimBlock(BaseModel):
    """A registry entry's ``fim:`` block: the marker texts of its FIM format. A marker that is one token of the
    model's vocabulary becomes that token's id; one that is not (a model trained without FIM tokens) is
    tokenized as text."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(min_length=1, description="the marker before the text before the cursor")
    suffix: str = Field(min_length=1, description="the marker before the text after the cursor")
    middle: str = Field(min_length=1, description="the marker after which the model writes the middle")
    order: Literal["psm", "spm"] = Field("psm", description="psm: prefix, suffix, middle; spm: suffix first")
    repo_name: str | None = Field(None, description="the marker before the project's name (repository context)")
    file_sep: str | None = Field(None, description="the marker before each file's name (repository context)")
    stop: list[str] = Field(default_factory=list, description="texts that end a middle (besides the end token)")


class Vocab(Protocol):
    """What prompt building needs of a backend's tokenizer."""

    #: The token the model expects first (its tokenizer adds it), or None.
    bos: int | None
    #: How many tokens it has (token-id prompts are checked against it).
    n_vocab: int

    def tokenize(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``, with no BOS; ``special``: marker texts become their control tokens."""
        ...


@dataclass(frozen=True, slots=True)
class Prompt:
    """A completion prompt: ``text`` (or token ids) continued as is; with ``suffix``, a FIM prompt whose prefix
    is ``text``. ``files`` are other files of the project as (name, text), before the prefix; ``repo`` names the
    project and ``filename`` the file being edited (repository context)."""

    text: str | list[int]
    suffix: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    repo: str | None = None
    filename: str | None = None

    @property
    def fim(self) -> bool:
        return self.suffix is not None or bool(self.files)


@dataclass(frozen=True, slots=True)
class FimTokens:
    """A model's FIM markers as token ids, where they came from, and what ends a middle."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    middle: tuple[int, ...]
    order: str = "psm"
    repo_name: tuple[int, ...] | None = None
    file_sep: tuple[int, ...] | None = None
    #: Tokens that end a middle besides the model's end token (the file separator, the FIM pad token).
    stop_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    source: str = "registry"  # gguf | tokenizer | registry
    #: The prefix, suffix and middle markers as text (for an Ollama template that shows them).
    names: tuple[str, str, str] = ("", "", "")


#: FIM special tokens of the code model families, as their tokenizers spell them: prefix, suffix, middle, the
#: repository-name and file-separator candidates, and the tokens that end a middle.
FAMILIES: tuple[tuple[str, str, str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    ("qwen2.5-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", ("<|repo_name|>",), ("<|file_sep|>",),
     ("<|fim_pad|>", "<|endoftext|>", "<|file_sep|>")),
    ("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", ("<repo_name>", "<reponame>"), ("<file_sep>",),
     ("<fim_pad>", "<|endoftext|>", "<file_sep>")),
    ("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", (), (), ()),
    ("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", (), (), ("▁<EOT>",)),
)


#: What precedes each file of the repository context of a model without a file separator token (llama.cpp's
#: server writes the same).
SNIPPET = "\n\n--- snippet ---\n\n"


def tokens_of(vocab: Vocab, text: str, special: bool, add_bos: bool) -> list[int]:
    """``text``'s token ids, after the model's BOS when ``add_bos`` and its tokenizer adds one."""
    return ([vocab.bos] if add_bos and vocab.bos is not None else []) + vocab.tokenize(text, special)


def check_ids(ids: list[int], n_vocab: int, model: str) -> list[int]:
    """Token ids that are all in a vocabulary of ``n_vocab``, or an InvalidRequestError naming the others."""
    if bad := [t for t in ids if not 0 <= t < n_vocab]:
        raise InvalidRequestError(f"token id(s) {bad[:5]} are not in model {model!r}'s vocabulary of {n_vocab}")
    return list(ids)


def single(vocab: Vocab, text: str) -> int | None:
    """The id of the one control token whose text is ``text`` (read as plain text it would be other tokens),
    or None."""
    ids = vocab.tokenize(text, True)
    return ids[0] if len(ids) == 1 and vocab.tokenize(text, False) != ids else None


def family_tokens(vocab: Vocab) -> FimTokens | None:
    """The FIM tokens of the first known family whose three markers are tokens of ``vocab``."""
    for _, pre, suf, mid, reps, seps, stops in FAMILIES:
        ids = [single(vocab, t) for t in (pre, suf, mid)]
        if None in ids:
            continue
        rep = next((i for t in reps if (i := single(vocab, t)) is not None), None)
        sep = next((i for t in seps if (i := single(vocab, t)) is not None), None)
        stop_ids = frozenset(i for t in stops if (i := single(vocab, t)) is not None)
        return FimTokens((ids[0],), (ids[1],), (ids[2],), "psm",  # type: ignore[arg-type]
                         (rep,) if rep is not None else None, (sep,) if sep is not None else None, stop_ids,
                         source="tokenizer", names=(pre, suf, mid))
    return None


def _marker(vocab: Vocab, text: str) -> tuple[int, ...]:
    return tuple(vocab.tokenize(text, True))


def fim_tokens(model: str, backend: str, vocab: Vocab, native: FimTokens | None, block: FimBlock | None) -> FimTokens:
    """The FIM format of a model: its registry ``fim:`` block when it has one, else the model's own tokens;
    neither is an UnsupportedFeatureError that names the model and the registry key."""
    if block is not None:
        stop_ids = frozenset(i for t in (block.file_sep,) if t and (i := single(vocab, t)) is not None)
        return FimTokens(
            _marker(vocab, block.prefix), _marker(vocab, block.suffix), _marker(vocab, block.middle), block.order,
            _marker(vocab, block.repo_name) if block.repo_name else None,
            _marker(vocab, block.file_sep) if block.file_sep else None,
            stop_ids | (native.stop_ids if native is not None else frozenset()), tuple(block.stop), "registry",
            (block.prefix, block.suffix, block.middle),
        )
    if native is not None:
        return native
    raise UnsupportedFeatureError(
        backend, f"fill-in-the-middle (a suffix) with model {model!r}: its vocabulary has no FIM tokens; give its "
        "registry entry a fim: block (prefix, suffix, middle markers)",
    )


def prompt_ids(vocab: Vocab, fim: FimTokens | None, prompt: Prompt, model: str, backend: str) -> list[int]:
    """The token ids of a completion prompt. ``fim`` is needed for a prompt with a suffix or files."""
    bos = [vocab.bos] if vocab.bos is not None else []
    if isinstance(prompt.text, list):
        if prompt.fim:
            raise InvalidRequestError("a suffix needs the prompt as text, not token ids")
        return check_ids(prompt.text, vocab.n_vocab, model)
    if not prompt.fim:
        return tokens_of(vocab, prompt.text, True, True)  # a raw prompt may spell control tokens (Continue's FIM)
    assert fim is not None

    def text(t: str) -> list[int]:
        return vocab.tokenize(t, False) if t else []

    extra: list[int] = []
    if prompt.files or prompt.repo:
        if fim.repo_name is not None:
            extra += [*fim.repo_name, *text((prompt.repo or "myproject") + "\n")]
        for name, content in prompt.files:
            # Without a file separator token, each file follows a plain-text separator, as llama.cpp's server
            # does (its name is then not given).
            extra += [*fim.file_sep, *text(name + "\n")] if fim.file_sep is not None else text(SNIPPET)
            extra += text(content)
        if fim.file_sep is not None:
            extra += [*fim.file_sep, *text((prompt.filename or "filename") + "\n")]
    assert isinstance(prompt.text, str)
    head = [*fim.prefix, *text(prompt.text)]
    tail = [*fim.suffix, *text(prompt.suffix or "")]
    body = head + tail if fim.order == "psm" else tail + head
    return bos + extra + body + list(fim.middle)


def files_of(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    """Repository context as (name, text) pairs, from ``[{"filename", "text"}]`` (llama.cpp's ``input_extra``),
    ``{name: text}`` or pairs; anything else is an InvalidRequestError naming ``what``."""
    if value is None:
        return ()
    items: Sequence[Any] = list(value.items()) if isinstance(value, dict) else value
    out = []
    for i, item in enumerate(items if isinstance(items, (list, tuple)) else [None]):
        if isinstance(item, dict) and set(item) <= {"filename", "text"} and isinstance(item.get("text", ""), str):
            name, body = item.get("filename", "tmp"), item.get("text", "")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, body = item
        else:
            raise InvalidRequestError(f"{what}[{i}] must be {{\"filename\": ..., \"text\": ...}}, got {item!r:.100}")
        if not isinstance(name, str) or not isinstance(body, str):
            raise InvalidRequestError(f"{what}[{i}]: filename and text must be strings")
        out.append((name, body))
    return tuple(out)


@dataclass(slots=True)
class LegacyLogprobs:
    """OpenAI's completion logprobs (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) from the
    per-token entries the backends return."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, entries: list[dict[str, Any]], start: int = 0) -> LegacyLogprobs:
        out, at = cls(), start
        for e in entries:
            out.tokens.append(e["token"])
            out.token_logprobs.append(e["logprob"])
            out.top_logprobs.append({t["token"]: t["logprob"] for t in e.get("top_logprobs") or []})
            out.text_offset.append(at)
            at += len(e["token"])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


class TokenizerVocab:
    """A Hugging Face tokenizer (transformers', or the one vLLM's engine holds), as prompt building uses it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        marked, plain = tokenizer.encode("a", add_special_tokens=True), tokenizer.encode("a", add_special_tokens=False)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = bos if bos is not None and len(marked) > len(plain) and marked[0] == bos else None
        self.n_vocab = len(tokenizer)

    def tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        if special:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
