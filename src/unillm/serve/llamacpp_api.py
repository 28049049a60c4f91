"""llama.cpp server's own API, as far as editor plugins use it (llama.vscode, llama.vim): ``/infill``,
``/completion``, ``/tokenize``, ``/detokenize``, ``/apply-template``, ``/health`` and ``/props``, in its JSON
shapes. A request names its model with ``model``; without one it goes to the first model loaded (``unillm serve
--load``), else to the registry's ``default``.

Fields that would change the answer and that unillm cannot honour are refused by name. ``n_indent`` and
``t_max_predict_ms`` end the answer as llama.cpp does (a limit: ``stop_type`` ``limit``); ``samplers`` turns
top_k, top_p, min_p and typical_p on when listed and off when not, and adds llama.cpp's ``infill`` sampler;
``cache_prompt``, ``id_slot`` and ``t_max_prompt_ms`` (which llama.cpp itself does not apply) change how fast an
answer comes, never what it is.

Example:
    >>> llamacpp_params({"n_predict": 16, "top_k": 40, "samplers": ["top_k", "top_p", "infill"]})
    {'max_tokens': 16, 'extra': {'top_k': 40, 'min_p': 0.0, 'typical_p': 1.0, 'infill': True}}
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..completions import files_of
from ..errors import InvalidRequestError, UnillmError
from ..types import Completion
from .wire import sse

if TYPE_CHECKING:
    from .app import Server

#: Fields that are unillm parameters (llama.cpp's name: unillm's).
PARAMS = {"n_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
#: Fields that are llama.cpp sampling options (``extra``), under the name the llamacpp backend takes.
EXTRA = {"top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
         "repeat_last_n": "repeat_last_n", "penalty_last_n": "repeat_last_n", "mirostat": "mirostat_mode", "mirostat_tau": "mirostat_tau",
         "mirostat_eta": "mirostat_eta", "n_indent": "n_indent", "t_max_predict_ms": "t_max_predict_ms"}
#: Fields that change how fast an answer comes, not what it is.
SPEED_ONLY = {"cache_prompt", "id_slot", "t_max_prompt_ms", "timings_per_token", "return_progress", "sse_ping_interval"}
#: Samplers that ``samplers`` may list, by the option each one reads; one that it leaves out is off (the
#: option's neutral value). Temperature and the penalties always apply; ``infill`` adds llama.cpp's.
SAMPLERS = {"top_k": ("top_k",), "top_p": ("top_p",), "min_p": ("min_p",), "typical_p": ("typ_p", "typical_p")}
OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0}
ALWAYS = {"temperature", "penalties", "infill"}
OWN = {"model", "prompt", "input_prefix", "input_suffix", "input_extra", "stream", "n_probs", "n_cmpl", "samplers"}


def llamacpp_params(body: dict[str, Any]) -> dict[str, Any]:
    """The engine parameters of a /completion or /infill body; a field unillm would not honour is a 400."""
    unknown = set(body) - set(PARAMS) - set(EXTRA) - SPEED_ONLY - OWN
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
    params = {dst: body[src] for src, dst in PARAMS.items() if body.get(src) is not None}
    extra = {dst: body[src] for src, dst in EXTRA.items() if body.get(src) is not None}
    if isinstance(params.get("max_tokens"), int) and params["max_tokens"] < 0:
        del params["max_tokens"]  # -1: until a stop or the end of the context
    samplers = body.get("samplers")
    if samplers is not None:
        if not isinstance(samplers, list) or not all(isinstance(s, str) for s in samplers):
            raise InvalidRequestError("samplers must be a list of sampler names")
        known = {n for names in SAMPLERS.values() for n in names} | ALWAYS
        bad = sorted(set(samplers) - known)
        if bad:
            raise InvalidRequestError(f"samplers {bad} are not supported by unillm (known: {sorted(known)})")
        for key, names in SAMPLERS.items():
            if not set(names) & set(samplers):
                (params if key == "top_p" else extra)[key] = OFF[key]
        if "infill" in samplers:
            extra["infill"] = True
    if body.get("n_probs"):
        params["logprobs"], params["top_logprobs"] = True, body["n_probs"]
    if extra:
        params["extra"] = extra
    return params


def stop_type(finish: str | None) -> str:
    return {"stop": "eos", "length": "limit"}.get(finish or "", "none")


def probabilities(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-token log probabilities in llama.cpp's ``completion_probabilities`` shape."""
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]} for t in e.get("top_logprobs") or []]}
            for e in entries]


def final(r: Completion, content: str, prompt: str, index: int = 0, lp: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The last object of an answer, in llama.cpp server's shape."""
    u, t = r.usage, r.timings
    n_prompt, n_gen, cached = (u.prompt_tokens, u.completion_tokens, u.cached_tokens) if u else (0, 0, 0)
    prompt_s = (t.ttft_s or 0.0) if t else 0.0
    gen_s = max((t.total_s - prompt_s) if t else 0.0, 0.0)
    out = {
        "index": index, "content": content, "tokens": [], "id_slot": -1, "stop": True, "model": r.model,
        "tokens_predicted": n_gen, "tokens_evaluated": n_prompt, "prompt": prompt, "has_new_line": "\n" in content,
        "truncated": False, "stop_type": stop_type(r.finish_reason), "stopping_word": "", "tokens_cached": cached,
        "timings": {"cache_n": cached, "prompt_n": n_prompt - cached, "prompt_ms": prompt_s * 1e3,
                    "prompt_per_token_ms": prompt_s * 1e3 / max(n_prompt - cached, 1),
                    "prompt_per_second": (n_prompt - cached) / prompt_s if prompt_s else 0.0,
                    "predicted_n": n_gen, "predicted_ms": gen_s * 1e3, "predicted_per_token_ms": gen_s * 1e3 / max(n_gen, 1),
                    "predicted_per_second": n_gen / gen_s if gen_s else 0.0},
        "generation_settings": {"n_predict": -1, "model": r.model},
    }
    if lp is not None:
        out["completion_probabilities"] = probabilities(lp)
    return out


def routes(server: Server) -> list[Route]:
    """llama.cpp server's routes over ``server``."""
    engine = server.engine

    def model_of(body: dict[str, Any]) -> str:
        name = body.get("model")
        if name is not None:
            return name  # type: ignore[no-any-return]  # Registry.get refuses what is not a string
        loaded = engine.loaded()
        return loaded[0] if loaded else "default"

    async def generate(request: Request, infill: bool) -> Response:
        try:
            body = await server.body_of(request)
            params = llamacpp_params(body)
            model = model_of(body)
            server.check_not_self(model)
            if infill:
                for key in ("input_prefix", "input_suffix"):
                    if not isinstance(body.get(key), str):
                        raise InvalidRequestError(f"{key} is required and must be a string")
                # llama.cpp's prompt (the text typed on the cursor's line) follows the prefix.
                kw: dict[str, Any] = {"suffix": body["input_suffix"], "files": files_of(body.get("input_extra"), "input_extra")}
                prompt: Any = body["input_prefix"] + (body.get("prompt") or "")
            else:
                kw, prompt = {}, body.get("prompt")
            prepare = params.get("max_tokens") == 0  # n_predict 0: evaluate the prompt into the cache only
            if prepare:
                params["max_tokens"] = 1
            n = body.get("n_cmpl") or 1
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise InvalidRequestError(f"n_cmpl must be a positive integer, got {n!r}")
            if not body.get("stream"):
                r = await engine.acomplete(model, prompt, n=n, **kw, **params)
                shown = prompt if isinstance(prompt, str) else ""
                out = []
                for c in r.choices:
                    lp = c.logprobs
                    entries = [{"token": tok, "logprob": lpv, "bytes": list(tok.encode()), "top_logprobs": [
                        {"token": k, "logprob": v, "bytes": list(k.encode())} for k, v in top.items()]}
                        for tok, lpv, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])] if lp else None
                    one = final(r, "" if prepare else c.text, shown, c.index, entries)
                    one["stop_type"] = stop_type(c.finish_reason)
                    if prepare:
                        one["tokens_predicted"] = 0
                    out.append(one)
                return JSONResponse(out[0] if len(out) == 1 else out)
            if n != 1:
                raise InvalidRequestError("n_cmpl > 1 is not streamed by unillm: ask without stream")
            stream = await engine.acomplete(model, prompt, stream=True, **kw, **params)
        except UnillmError as exc:
            return server.error(exc, api="ollama")

        count = 0
        shown = prompt if isinstance(prompt, str) else ""

        def events(c: Completion) -> list[dict[str, Any]]:
            nonlocal count
            text = "" if prepare else c.text
            count += 1
            piece = {"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": -1}
            if c.finish_reason is None:
                return [{**piece, "tokens_predicted": count, "tokens_evaluated": 0}]
            last = final(c, "", shown)  # llama.cpp's last object has no content: the last text goes before it
            if prepare:
                last["tokens_predicted"] = 0
            return ([piece] if text else []) + [last]

        return sse(stream, events, done=False)

    async def infill(request: Request) -> Response:
        return await server.admitted(request, lambda: generate(request, infill=True), api="ollama")

    async def completion(request: Request) -> Response:
        return await server.admitted(request, lambda: generate(request, infill=False), api="ollama")

    async def tokenize(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            unknown = set(body) - {"model", "content", "add_special", "parse_special", "with_pieces"}
            if unknown:
                raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
            model, content = model_of(body), body.get("content")
            ids = await engine.atokenize(model, content, special=bool(body.get("parse_special", True)),  # type: ignore[arg-type]
                                         add_bos=bool(body.get("add_special")))
            if body.get("with_pieces"):
                pieces = [await engine.adetokenize(model, [t]) for t in ids]
                return JSONResponse({"tokens": [{"id": t, "piece": p} for t, p in zip(ids, pieces)]})
            return JSONResponse({"tokens": ids})
        except UnillmError as exc:
            return server.error(exc, api="ollama")

    async def detokenize(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            return JSONResponse({"content": await engine.adetokenize(model_of(body), body.get("tokens"))})  # type: ignore[arg-type]
        except UnillmError as exc:
            return server.error(exc, api="ollama")

    async def apply_template(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            unknown = set(body) - {"model", "messages"}
            if unknown:
                raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
            return JSONResponse({"prompt": await engine.aapply_chat_template(model_of(body), body.get("messages"))})  # type: ignore[arg-type]
        except UnillmError as exc:
            return server.error(exc, api="ollama")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def props(request: Request) -> Response:
        try:
            spec = engine.registry.get(model_of(dict(request.query_params)))
        except UnillmError as exc:
            return server.error(exc, api="ollama")
        backend = engine.backend(spec.name)
        info = backend.info() if backend is not None else {}
        return JSONResponse({
            "default_generation_settings": {"n_ctx": spec.context_window, "model": spec.name, "params": {"n_predict": -1}},
            "total_slots": info.get("parallel") or 1, "model_path": info.get("path", ""), "model_alias": spec.name,
            "chat_template": getattr(backend, "_template", None) or "", "modalities": {"vision": False, "audio": False},
            "build_info": f"unillm {__version__}", "is_sleeping": False, "loaded": backend is not None,
            "timestamp": int(time.time()),
        })

    return [
        Route("/infill", infill, methods=["POST"]),
        Route("/completion", completion, methods=["POST"]),
        Route("/completions", completion, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/apply-template", apply_template, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
    ]
