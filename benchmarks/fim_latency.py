"""Editor latency: 30 successive fill-in-the-middle requests over a 1,500-token file, as llama.vscode sends
them to /infill while someone types (the prefix is the lines above the cursor, ``prompt`` the cursor's line up
to the cursor, the suffix the next 16 lines; the line grows a few characters per request and every tenth
request the cursor moves to a new line). Prints each request's time to first token (TTFT) on unillm serve and
on llama.cpp's own llama-server, on the same GGUF (the Q8_0 weights unillm's smollm2 entry runs on the CPU),
the same threads and batch size, against a cold request (an empty cache) on each.

SmolLM2 has no FIM tokens, so both use three of its special tokens as the markers: unillm through a registry
``fim:`` block, llama-server through ``--override-kv tokenizer.ggml.fim_*_token_id``; both then build the
same token ids (llama.cpp's format_prompt_infill and unillm.completions.prompt_ids).

Setup (not in CI: about 10 minutes on 2 cores), then the run:

    python benchmarks/fim_latency.py --build          # llama-server from the llama.cpp that llama-cpp-python's sdist vendors
    python benchmarks/fim_latency.py                  # or --llama-server PATH
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import smollm2_weights  # noqa: E402

MARKERS = {"prefix": "<filename>", "suffix": "<gh_stars>", "middle": "<issue_start>"}
THREADS = int(os.environ.get("UNILLM_BENCH_THREADS", os.cpu_count() or 2))


def server_home() -> Path:
    import llama_cpp

    from unillm.system import cache_root

    return cache_root() / f"llama-server-{llama_cpp.__version__}"


def build() -> Path:
    """Build llama-server from the llama.cpp sources that the installed llama-cpp-python's sdist vendors."""
    import llama_cpp

    home = server_home()
    binary = home / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={llama_cpp.__version__}", "-d", tmp], check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            tar.extractall(home / "src", filter="data")
    source = next((home / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
    subprocess.run(["cmake", "-S", str(source), "-B", str(home / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(home / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen, path: str = "/health") -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited ({proc.returncode})")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server at {url} did not start")


def source_file() -> str:
    """About 1,500 tokens of Python: small functions of a made-up inventory module."""
    parts = ['"""Inventory helpers."""\n\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass Item:\n'
             '    name: str\n    price: float\n    count: int\n\n']
    for i in range(18):
        parts.append(f"def total_{i}(items: list[Item], discount: float = 0.{i % 9}) -> float:\n"
                     f"    \"\"\"The value of the items of group {i}, after a discount.\"\"\"\n"
                     f"    value = sum(item.price * item.count for item in items if item.count > {i})\n"
                     f"    return round(value * (1 - discount), 2)\n\n\n")
    return "".join(parts)


TYPED = ["    best = max(items, key=lambda item: item.price * item.count)",
         "    if best.count == 0 or best.price <= 0.0 or not best.name:",
         "        raise ValueError(f'no item of {best.name!r} is in stock')"]


def requests(text: str) -> list[dict]:
    """30 /infill bodies: typing three new lines into the function at three quarters of the file, a few
    characters per request (llama.vscode's shape: the lines above, the cursor's line so far, 16 lines after)."""
    lines = text.split("\n")
    at = next(i for i in range(int(len(lines) * 0.75), len(lines)) if lines[i].startswith("def ")) + 3
    out, done = [], []
    for i in range(30):
        line, k = TYPED[i // 10], 6 + (i % 10) * 5
        above = lines[:at] + done
        out.append({"input_prefix": "\n".join(above) + "\n", "prompt": line[:k],
                    "input_suffix": line[k:] + "\n" + "\n".join(lines[at:at + 16]), "input_extra": [],
                    "n_predict": 16, "temperature": 0, "top_k": 40, "top_p": 0.99, "stream": True,
                    "cache_prompt": True, "samplers": ["top_k", "top_p"]})
        if i % 10 == 9:
            done.append(line)
    return out


def ttft(url: str, body: dict, model: str | None = None) -> float:
    """Seconds from sending a streamed /infill to its first generated text."""
    if model:
        body = {**body, "model": model}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/infill", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}/infill answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("content") or event.get("stop"):
                    return time.perf_counter() - t0
    raise SystemExit(f"{url}/infill ended without a token")


def replay(servers: dict[str, tuple[str, str | None]], bodies: list[dict]) -> dict[str, tuple[float, list[float]]]:
    """Each request to every server in turn (paired: the same moment, the same load on the machine; the order
    rotates from one request to the next, so that none is always first); each server's cache holds only its own
    requests. The first is cold: nothing of this file is cached yet."""
    warmup = {**bodies[0], "input_prefix": "x = 1\n", "input_suffix": "", "prompt": ""}
    for url, model in servers.values():
        ttft(url, warmup, model)
    times: dict[str, list[float]] = {name: [] for name in servers}
    names = list(servers)
    for i, body in enumerate(bodies):
        for name in names[i % len(names):] + names[: i % len(names)]:
            url, model = servers[name]
            times[name].append(ttft(url, body, model))
    return {name: (t[0], t[1:]) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="build llama-server from the sdist's llama.cpp first")
    ap.add_argument("--llama-server", help="a llama-server binary (default: the one --build made)")
    args = ap.parse_args()
    binary = Path(args.llama_server) if args.llama_server else (build() if args.build else server_home() / "build" / "bin" / "llama-server")
    if not binary.is_file():
        raise SystemExit(f"no llama-server at {binary}: run with --build (or --llama-server PATH)")
    weights = smollm2_weights()
    text = source_file()
    bodies = requests(text)
    procs: list[subprocess.Popen] = []
    servers: dict[str, tuple[str, str | None]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "bench.yaml"
            fim = ", ".join(f'{k}: "{v}"' for k, v in MARKERS.items())
            cfg.write_text(f"models:\n  - name: smollm2-fim\n    backend: llamacpp\n    source: {{path: {weights}}}\n"
                           f"    context_window: 4096\n    fim: {{{fim}}}\n"
                           f"    options: {{parallel: 4, flash_attn: true, n_threads: {THREADS}, cpu_weights: file}}\n")
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "unillm", "serve", "--port", str(port), "--config",
                                           str(cfg), "--load", "smollm2-fim"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            url = f"http://127.0.0.1:{port}"
            wait_up(url, procs[-1])
        servers["unillm serve"] = (url, "smollm2-fim")
        ids = {k: httpx.post(url + "/tokenize", json={"model": "smollm2-fim", "content": v}).json()["tokens"]
               for k, v in MARKERS.items()}
        assert all(len(v) == 1 for v in ids.values()), ids
        n_file = len(httpx.post(url + "/tokenize", json={"model": "smollm2-fim", "content": text}).json()["tokens"])
        overrides = [f"tokenizer.ggml.fim_{k}_token_id=int:{ids[v][0]}" for k, v in
                     (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle"))]
        for label, extra in (("llama-server", []), ("llama-server --cache-reuse 64", ["--cache-reuse", "64"])):
            port = free_port()
            cmd = [str(binary), "-m", weights, "--port", str(port), "-t", str(THREADS), "-tb", str(THREADS),
                   "-c", "4096", "-np", "1", "-b", "2048", "-ub", "512", "-fa", "on", "--no-webui", *extra]
            for o in overrides:
                cmd += ["--override-kv", o]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_up(f"http://127.0.0.1:{port}", procs[-1])
            servers[label] = (f"http://127.0.0.1:{port}", None)
        runs = replay(servers, bodies)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()

    names = list(runs)
    print(f"FIM replay: {len(bodies)} /infill requests over a {n_file}-token file, SmolLM2-135M Q8_0, {THREADS} threads, "
          f"n_predict 16, greedy; TTFT in ms (request 1 is cold: nothing cached)")
    print(f"{'req':>4} " + " ".join(f"{n:>32}" for n in names))
    print(f"{1:>4} " + " ".join(f"{runs[n][0] * 1e3:>32.0f}" for n in names))
    for i in range(len(bodies) - 1):
        print(f"{i + 2:>4} " + " ".join(f"{runs[n][1][i] * 1e3:>32.0f}" for n in names))
    print()
    for n in names:
        cold, warm = runs[n]
        print(f"{n:>32}: cold {cold * 1e3:.0f} ms, warm median {statistics.median(warm) * 1e3:.0f} ms "
              f"(max {max(warm) * 1e3:.0f}), warm/cold {statistics.median(warm) / cold:.2f}")
    base = runs["llama-server"][1]
    ratios = [u / b for u, b in zip(runs["unillm serve"][1], base)]
    print(f"unillm / llama-server per warm request: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}, "
          f"{sum(r <= 1.0 for r in ratios)}/{len(ratios)} at or under 1.0x")


if __name__ == "__main__":
    main()
