"""The ``unillm`` command.

    unillm chat MODEL "prompt"        stream an answer to the terminal (prompt "-" or none: read stdin)
    unillm models                     the registry: name, backend, source, context, can it run here
    unillm batch IN.jsonl -o OUT.jsonl --model NAME [--template FILE] [--field text]
                                      a resumable batch job (re-run the same command to resume)
    unillm batch ... --ray [ADDRESS] --replicas N
                                      the same job on Ray replicas (a local instance, or a cluster)
    unillm serve [--port 11434]       the Ollama and OpenAI HTTP APIs over the registry, for other tools
    unillm doctor                     this machine: CPUs, memory, GPUs, backends, Ollama, what runs here
    unillm recommend --task code --users 20 [--stage production]
                                      the model guide's pick, applied to this machine
    unillm trust [unillm.yaml]        trust this project's registry file as it is now (see unillm.registry)
    unillm cache [prune]              what unillm keeps in its cache, and removing copies nobody uses

Example:
    $ unillm chat smollm2 "What is the capital of France?" --temperature 0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import UnillmError


def _add_params(p: argparse.ArgumentParser) -> None:
    """The chat parameters that have a flag (from unillm.params.PARAMS), and --schema."""
    from .params import PARAMS

    for name, param in PARAMS.items():
        if param.flags:
            repeat = name == "stop"
            p.add_argument(*param.flags, dest=name, type=param.cli_type or str, help=param.help,
                           action="append" if repeat else "store")
    p.add_argument("--schema", metavar="FILE_OR_JSON",
                   help="answer as JSON matching this JSON schema (a file, or the schema itself)")


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The chat parameters given on the command line."""
    from .params import PARAMS

    out = {name: getattr(args, name) for name in PARAMS if getattr(args, name, None) is not None}
    if args.schema:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "schema", "schema": _read_schema(args.schema)}}
    return out


def _read_schema(value: str) -> Any:
    from pathlib import Path

    from .errors import InvalidRequestError

    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequestError(f"--schema {value}: cannot read the file ({exc.strerror or exc})") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"--schema {value}: not JSON ({exc})") from exc


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", metavar="PATH", help="extra registry file (repeatable)")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="unillm", description="Run local LLMs in-process behind one API.")
    parser.add_argument("--version", action="version", version=f"unillm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer one prompt, streamed to the terminal")
    chat.add_argument("model", help="a registry name or alias (see `unillm models`)")
    chat.add_argument("prompt", nargs="?", help='the prompt; "-" or nothing reads it from stdin')
    chat.add_argument("-s", "--system", help="a system message")
    _add_params(chat)
    chat.add_argument("--no-stream", action="store_true", help="print the answer when it is complete")
    chat.add_argument("--stats", action="store_true", help="print usage and timings to stderr")
    _add_config(chat)

    models = sub.add_parser("models", help="list the model registry")
    models.add_argument("--json", action="store_true", help="one JSON object per model")
    models.add_argument("--load", action="append", metavar="MODEL",
                        help="load this model and show what it reports (device, KV cache capacity...)")
    _add_config(models)

    job = sub.add_parser("batch", help="run a resumable batch job over a JSONL file")
    job.add_argument("input", help="JSONL: one record per line with an 'id' and 'messages' or a text field")
    job.add_argument("-o", "--output", required=True, help="JSONL results, appended; existing ids are skipped")
    job.add_argument("-m", "--model", required=True)
    job.add_argument("--template", help="prompt template file; $text (or $FIELD) is replaced by the record's text")
    job.add_argument("--field", default="text", help="the record's text field (default: text)")
    job.add_argument("--retry-failed", action="store_true", help="redo records whose result was an error")
    _add_params(job)
    job.add_argument("--embed", action="store_true", help="write each record's embedding vector instead of an answer")
    job.add_argument("--no-progress", action="store_true")
    ray = job.add_argument_group("Ray (pip install 'unillm[ray]')")
    ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run the records on Ray replicas: alone, a Ray instance on this machine for the job; "
                          "'auto' or host:port or ray://host:10001 joins that cluster")
    ray.add_argument("--replicas", type=_positive, default=None, metavar="N", help="replicas, each with its own model (default 1)")
    ray.add_argument("--ray-batch-size", type=_positive, default=None, metavar="N",
                     help="records per Ray task (default: the model's slots)")
    ray.add_argument("--replica-cpus", type=float, default=None, metavar="N", help="CPUs each replica asks Ray for")
    ray.add_argument("--replica-gpus", type=float, default=None, metavar="N", help="GPUs each replica asks Ray for")
    _add_config(job)

    srv = sub.add_parser("serve", help="serve the registry over HTTP: the Ollama API and the OpenAI API")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_port, default=11434)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set UNILLM_API_KEY)")
    srv.add_argument("--load", action="append", metavar="MODEL", help="load a model before serving (repeatable)")
    srv.add_argument("--allow-host", action="append", metavar="NAME",
                     help="a Host name this server answers to besides localhost and the bound address (repeatable; * for any)")
    srv.add_argument("--max-body", type=int, default=16 * 2**20, metavar="BYTES", help="largest request body (default 16 MiB)")
    srv.add_argument("--max-queue", type=int, default=256, metavar="N",
                     help="generation requests in flight before new ones get 503 (default 256)")
    srv.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="time a client has to send its whole request body before a 408 (default 30)")
    srv.add_argument("--keep-alive", type=int, default=5, metavar="SECONDS",
                     help="an idle keep-alive connection is closed after this long (default 5)")
    srv.add_argument("--max-connections", type=int, default=1024, metavar="N",
                     help="open connections and requests before new ones get 503 (default 1024)")
    _add_config(srv)

    tr = sub.add_parser("trust", help="trust this project's unillm.yaml as it is now (its entries may then use "
                                      "any backend, engine_args and paths)")
    tr.add_argument("file", nargs="?", default="unillm.yaml", help="the project file (default ./unillm.yaml)")

    conv = sub.add_parser("convert", help="make the safetensors folder of a GGUF model (for vLLM and transformers)")
    conv.add_argument("model", help="a registry model whose source is a GGUF (e.g. smollm2)")
    _add_config(conv)

    doc = sub.add_parser("doctor", help="what this machine has and which models can run on it")
    doc.add_argument("--json", action="store_true")
    _add_config(doc)

    cache = sub.add_parser("cache", help="what unillm keeps in its cache (UNILLM_CACHE), and pruning it")
    cache.add_argument("action", nargs="?", default="list", choices=["list", "prune"],
                       help="list (default), or prune: remove the GGUF copies whose sources are gone")
    cache.add_argument("--json", action="store_true")

    rec = sub.add_parser("recommend", help="the model guide's recommendation for a workload, on this machine")
    rec.add_argument("--task", required=True, choices=["code", "chat", "content", "research", "batch"])
    rec.add_argument("--users", type=int, default=1, help="concurrent users (default 1)")
    rec.add_argument("--stage", default="prototype", choices=["prototype", "testing", "production"])
    rec.add_argument("--json", action="store_true")
    _add_config(rec)
    return parser


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt not in (None, "-"):
        return str(args.prompt)
    if args.prompt is None and sys.stdin.isatty():
        raise SystemExit("unillm chat: give a prompt, or pipe one in (prompt '-' reads stdin)")
    return sys.stdin.read()


def _cmd_chat(args: argparse.Namespace) -> int:
    from .engine import Engine

    prompt = _read_prompt(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    params = _params(args)
    with Engine(args.config) as engine:
        # With a schema, stdout gets the whole valid JSON or nothing: a stream cut short (or not matching the
        # schema) would leave partial JSON where a script reads it.
        if args.no_stream or "response_format" in params:
            r = engine.chat(args.model, messages, **params)
            if r.choices[0].message.reasoning_content:  # a reasoning model's thinking: beside the answer, not in it
                print(r.choices[0].message.reasoning_content, file=sys.stderr)
            sys.stdout.write(r.text + "\n")
            usage, timings, model, backend = r.usage, r.timings, r.model, r.backend
        else:
            last, thinking = None, False
            for chunk in engine.chat(args.model, messages, stream=True, **params):
                if chunk.choices[0].delta.reasoning_content:  # on stderr: stdout is the answer alone
                    sys.stderr.write(chunk.choices[0].delta.reasoning_content)
                    sys.stderr.flush()
                    thinking = True
                if chunk.text and thinking:
                    sys.stderr.write("\n")
                    thinking = False
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            sys.stdout.write("\n")
            assert last is not None
            usage, timings, model, backend = last.usage, last.timings, last.model, last.backend
    if args.stats and usage is not None and timings is not None:
        rate = f"{timings.decode_tokens_per_s:.1f} tok/s" if timings.decode_tokens_per_s else "n/a"
        ttft = f"{timings.ttft_s * 1000:.0f} ms" if timings.ttft_s is not None else "n/a"
        print(
            f"[{model} on {backend}] prompt {usage.prompt_tokens} tok, completion {usage.completion_tokens} tok, "
            f"load {timings.load_s:.2f} s, TTFT {ttft}, decode {rate}",
            file=sys.stderr,
        )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .registry import Registry
    from .system import why_not_runnable

    registry = Registry.load(args.config)
    rows = []
    for spec in registry:
        reason = why_not_runnable(spec)
        rows.append(
            {
                "name": spec.name,
                "aliases": spec.aliases,
                "backend": spec.backend,
                "source": spec.source.describe(),
                "context_window": spec.context_window,
                "runs_here": reason is None,
                "why_not": reason,
            }
        )
    if args.load:
        from .engine import Engine

        with Engine(registry=registry) as engine:
            for name in args.load:
                load_s = engine.load(name)
                backend = engine.backend(name)
                info = backend.info() if backend is not None else {}
                if backend is not None:  # the family it is read as: the registry's chat_format, or its template's
                    info["chat_format"] = backend.family().name
                row = next(r for r in rows if r["name"] == registry.get(name).name)
                row["loaded"] = {"load_s": round(load_s, 2), **info}
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return 0
    import shutil
    import textwrap

    width = max(shutil.get_terminal_size().columns, 40)  # COLUMNS, else the terminal's, else 80
    header = ("NAME", "BACKEND", "CONTEXT", "RUNS HERE", "SOURCE")
    table = [header] + [
        (r["name"], r["backend"], str(r["context_window"]), "yes" if r["runs_here"] else "no", r["source"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row, r in zip(table, [None, *rows]):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
        print(line if len(line) <= width else line[: width - 3] + "...")
        if r is not None and r["why_not"]:
            print(textwrap.fill(r["why_not"], width, initial_indent="    why not: ", subsequent_indent="    "))
    for name, problem in registry.problems.items():
        print(f"{name}: refused: {problem}")
    for r in rows:
        if "loaded" in r:
            facts = r["loaded"]
            line = "; ".join(f for f in (facts.get("max_concurrency_text"), facts.get("dtype_choice") and f"dtype {facts['dtype_choice']}") if f) \
                or ", ".join(f"{k}={v}" for k, v in facts.items() if k != "engine_args")
            print(f"{r['name']}: loaded in {facts['load_s']} s; {line}")
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .jobs import run_job

    params = _params(args)
    ray_only = {"--replicas": args.replicas, "--ray-batch-size": args.ray_batch_size,
                "--replica-cpus": args.replica_cpus, "--replica-gpus": args.replica_gpus}
    ray = None
    if args.ray is not None:
        from .cluster import RayConfig

        ray = RayConfig(address=args.ray or None, replicas=args.replicas or 1, batch_size=args.ray_batch_size,
                        cpus=args.replica_cpus, gpus=args.replica_gpus)
    elif any(v is not None for v in ray_only.values()):
        given = ", ".join(k for k, v in ray_only.items() if v is not None)
        raise SystemExit(f"unillm batch: {given} only apply with --ray")
    with Engine(args.config) as engine:
        summary = run_job(
            engine, args.input, args.output, args.model, template=args.template, text_field=args.field,
            retry_failed=args.retry_failed, progress=not args.no_progress, embed=args.embed, ray=ray, **params,
        )
    print(summary, file=sys.stderr)
    for err in summary.errors[:20]:
        print(f"  {err}", file=sys.stderr)
    return 1 if summary.failed or summary.invalid else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .serve import serve
    except ImportError as exc:
        raise SystemExit(f"unillm serve needs starlette and uvicorn: pip install 'unillm[serve]' ({exc})") from exc
    from . import __version__

    def ready() -> None:  # the socket is bound and the --load models are loaded
        print(f"unillm {__version__} serving on http://{args.host}:{args.port} "
              "(Ollama API under /api; OpenAI and Anthropic APIs under /v1)", flush=True)

    serve(args.host, args.port, args.api_key or os.environ.get("UNILLM_API_KEY"), args.config, args.load,
          allow_hosts=args.allow_host, max_body_bytes=args.max_body, max_queue=args.max_queue,
          body_timeout=args.body_timeout, keep_alive=args.keep_alive, max_connections=args.max_connections, on_ready=ready)
    return 0


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return n


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _cmd_trust(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .registry import trust

    p = Path(args.file)
    if not p.is_file():
        raise SystemExit(f"unillm trust: {p} is not a file")
    record = trust(p)
    print(f"trusted {p.resolve()} as it is now (recorded in {record}); after an edit, run unillm trust again")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_gguf
    from .registry import Registry

    print(convert_gguf(args.model, Registry.load(args.config)))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor, format_report
    from .registry import Registry

    try:
        registry, problems = Registry.load(args.config), {}
    except UnillmError as exc:  # a file given with --config or UNILLM_CONFIG: diagnose the rest anyway
        problems = {"<registry>": str(exc)}
        try:
            registry = Registry.load() if args.config else Registry()
        except UnillmError:
            registry = Registry()
    report = doctor(registry, problems)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .cache import entries, prune
    from .system import cache_root

    if args.action == "prune":
        removed = prune()
        if args.json:
            print(json.dumps([e.to_dict() for e in removed], indent=2))
        else:
            for e in removed:
                print(f"removed {e.path} ({_mib(e.size)})")
            print(f"pruned {len(removed)} file(s), {_mib(sum(e.size for e in removed))} freed from {cache_root()}")
        return 0
    found = entries()
    if args.json:
        print(json.dumps({"root": str(cache_root()), "entries": [e.to_dict() for e in found]}, indent=2))
        return 0
    print(f"{cache_root()}: {len(found)} entries, {_mib(sum(e.size for e in found))}")
    for e in found:
        why = "" if e.kept else "  (no source left: `unillm cache prune` removes it)"
        sources = f"  from {', '.join(e.sources)}" if e.sources else ""
        print(f"  {_mib(e.size):>10}  {e.path}{sources}{why}")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cmd_recommend(args: argparse.Namespace) -> int:
    from .recommend import recommend
    from .registry import Registry

    rec = recommend(args.task, args.users, args.stage, registry=Registry.load(args.config))
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
        return 0
    note = f"  (the guide's pick, {rec.guide_model}, cannot run here)" if rec.fallback_used else ""
    print(rec.model + note)
    for reason in rec.reasons:
        print(f"  - {reason}")
    return 0


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: the Engine closes (and with it every backend and vLLM's processes)."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    handler = {
        "chat": _cmd_chat, "models": _cmd_models, "batch": _cmd_batch, "serve": _cmd_serve, "convert": _cmd_convert,
        "trust": _cmd_trust,
        "doctor": _cmd_doctor, "recommend": _cmd_recommend, "cache": _cmd_cache,
    }[args.command]
    try:
        return handler(args)
    except UnillmError as exc:
        print(f"unillm: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `unillm models | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except OSError as exc:  # a missing input file, an output path that is a folder, a port in use...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"unillm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
