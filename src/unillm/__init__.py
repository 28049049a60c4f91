"""unillm: run local language models in your own process behind one API.

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                     # doctest: +SKIP
    ...     print(engine.chat("smollm2", "What is the capital of France?", temperature=0).text)
"""

from __future__ import annotations

from .engine import Engine
from .errors import (
    BackendNotInstalledError,
    BackendUnavailableError,
    ConfigError,
    ContextWindowExceededError,
    EngineClosedError,
    GenerationError,
    InvalidRequestError,
    JobError,
    ModelLoadError,
    ModelUnloadedError,
    StructuredOutputError,
    UnillmError,
    UnknownModelError,
    UnsupportedFeatureError,
)
from .registry import ModelSpec, Registry
from .params import ChatParams
from .completions import Prompt
from .types import ChatCompletion, ChatCompletionChunk, Completion, EmbeddingResponse, Message, Timings, ToolCall, Usage

__version__ = "0.1.0"

__all__ = [
    "BackendNotInstalledError",
    "BackendUnavailableError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatParams",
    "Completion",
    "ConfigError",
    "ContextWindowExceededError",
    "EmbeddingResponse",
    "Engine",
    "EngineClosedError",
    "GenerationError",
    "InvalidRequestError",
    "JobError",
    "Message",
    "ModelLoadError",
    "ModelSpec",
    "ModelUnloadedError",
    "Prompt",
    "Registry",
    "StructuredOutputError",
    "Timings",
    "ToolCall",
    "UnillmError",
    "UnknownModelError",
    "UnsupportedFeatureError",
    "Usage",
    "__version__",
]
