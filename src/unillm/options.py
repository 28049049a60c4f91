"""The registry's ``options`` of each built-in backend, as light pydantic models (no backend library is
imported): checked when the registry loads, so that a typo shows in ``unillm models`` and not at the first
chat, and parsed again by the backend that uses them.

Which backend takes which model is in :data:`unillm.backends.BACKENDS`.

Example:
    >>> from unillm.options import LlamaCppOptions
    >>> LlamaCppOptions.model_validate({"parallel": 4}).parallel
    4
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

if TYPE_CHECKING:
    from .registry import ModelSpec


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_gpu_layers: int | Literal["auto"] = "auto"
    n_threads: int | None = Field(None, ge=1)
    n_threads_batch: int | None = Field(None, ge=1)
    n_batch: int = Field(512, ge=1)
    flash_attn: bool = False
    use_mmap: bool = True
    chat_template: str | None = None
    #: Sequence slots decoded together (continuous batching); 1 runs one request at a time.
    parallel: int = Field(1, ge=1, le=256)
    #: With parallel > 1: one KV buffer shared by all slots (True), or a stream of its own per slot (False,
    #: the default: a slot's attention then reads only its own cells, so one request alone is not slowed by
    #: a cache sized for all slots).
    kv_unified: bool = False
    #: With kv_unified: the cells of that one buffer (default: parallel x context_window). A smaller pool lets
    #: many slots have a long window: a request is admitted when its prompt and max_tokens fit beside those of
    #: the requests running (it waits otherwise), and the prompts idle slots keep cached give way.
    kv_cells: int | None = Field(None, ge=1)
    #: With parallel > 1: a new prompt reuses the cache a free slot kept of the same beginning (as llama.cpp's
    #: server does). Like there, logits from a reused cache are not bit-identical to a full evaluation, so a
    #: greedy answer can change where two tokens are nearly tied; False evaluates every prompt in full.
    prompt_cache: bool = True
    #: How ``Engine.embed`` pools the token vectors of a text.
    pooling: Literal["mean", "cls", "last"] = "mean"
    #: The weights the CPU runs when no layer is offloaded: ``file`` (as stored) or ``q8_0``, a Q8_0 copy made
    #: once into the cache (``$UNILLM_CACHE/gguf``). llama.cpp's Q4_1 CPU kernels gain little from batching,
    #: Q8_0's far more (measured: benchmarks/decode_ceiling.py). A file already Q8_0 runs as it is.
    cpu_weights: Literal["file", "q8_0"] = "file"

    @model_validator(mode="after")
    def _pool_is_shared(self) -> LlamaCppOptions:
        if self.kv_cells is not None and (self.parallel < 2 or not self.kv_unified):
            raise ValueError("kv_cells sizes the KV buffer that slots share: it needs parallel > 1 and kv_unified: true")
        return self


class VLLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: str = "auto"
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    kv_cache_memory_bytes: int | None = Field(None, gt=0)
    max_num_seqs: int = Field(64, ge=1)
    quantization: str | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    #: How vLLM starts its workers when a model spans GPUs: ``mp`` (processes on this machine), ``ray`` (Ray
    #: workers, across machines), ``uni`` (one process); unset lets vLLM choose.
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None
    engine_args: dict[str, Any] = {}
    #: vLLM's tool parser for tool_choice "auto"; unset: the model family's (hermes for Qwen2.5 and
    #: Qwen2.5-Coder, llama3_json for Llama 3.1, mistral, deepseek_v3; see unillm.families).
    tool_parser: str | None = None


class HFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str | None = None
    keep_alive: str | float | None = None
    #: Seconds to wait for the daemon to accept a connection, and for each read of its answer.
    connect_timeout: float = Field(5.0, gt=0)
    timeout: float = Field(300.0, gt=0)
    concurrency: int = Field(4, ge=1)
    local_store: Literal["never", "fallback", "always"] = "fallback"
    store: str | None = None
    verify_sha256: bool = True
    llamacpp: LlamaCppOptions = LlamaCppOptions()


OptionsT = TypeVar("OptionsT", bound=BaseModel)


def parse_options(model: type[OptionsT], spec: ModelSpec) -> OptionsT:
    """A registry entry's ``options`` as the backend's pydantic model; a typo names the file and key."""
    try:
        return model.model_validate(spec.options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "".join(f".{p}" for p in ("options", *err["loc"]))[1:]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            fields = model.model_fields if len(err["loc"]) == 1 else {}
            close = difflib.get_close_matches(str(err["loc"][-1]), list(fields), n=1)
            msg = f"unknown key for the {spec.backend} backend" + (f" (did you mean {close[0]!r}?)" if close else "")
        raise ConfigError(f"model {spec.name!r}: {msg}", path=spec.config_file, key=key) from exc
