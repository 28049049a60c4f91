"""``unillm serve``: one local HTTP endpoint over an Engine, for tools that only speak HTTP.

It speaks the Ollama REST API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``; NDJSON streaming), the OpenAI API (``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``, ``/v1/responses``, ``/v1/embeddings``; SSE streaming), Anthropic's Messages API
(``/v1/messages``, ``/v1/messages/count_tokens``) and llama.cpp server's (``/infill``, ``/completion``...).
Models stay loaded in this process. It binds 127.0.0.1 unless told otherwise; with an API key every request
needs ``Authorization: Bearer KEY`` (or ``x-api-key: KEY``). Requests run concurrently; a GGUF model either batches
them (``options.parallel``) or takes them one at a time, never interleaved. A client that disconnects
mid-stream cancels its generation.

The package: ``app`` (routing, admission, error shapes, the server), ``guard`` (the checks in front of every
route), ``wire`` (what the APIs share), and one module per wire API (``ollama_api``, ``openai_api``, ``responses_api``, ``anthropic_api``,
``llamacpp_api``).

Example:
    $ unillm serve --port 11434          # then: OLLAMA_HOST=127.0.0.1:11434 ollama run smollm2 ...
"""

from __future__ import annotations

from .app import create_app, serve

__all__ = ["create_app", "serve"]
