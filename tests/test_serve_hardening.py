"""`unillm serve` under hostile input: malformed bodies are 400s naming the field, never 500s; the Host,
Origin and Content-Type guards; the API key on every route; body and queue limits; cancelled requests."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from conftest import QUESTION
from test_ollama_serve import free_port, start_server, stop

pytest.importorskip("starlette")


def request(url: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    stop(proc)


CHAT = {"model": "smollm2", "messages": QUESTION, "stream": False, "options": {"num_predict": 4}}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/chat", {**CHAT, "model": 123}, "model"),
        ("/api/chat", {**CHAT, "options": []}, "options"),
        ("/api/chat", {**CHAT, "options": "x"}, "options"),
        ("/api/chat", {**CHAT, "options": {"num_predict": "a"}}, "max_tokens"),
        ("/api/chat", {**CHAT, "messages": "hi"}, "messages"),
        ("/api/chat", {**CHAT, "stream": "yes"}, "stream"),
        ("/api/chat", {**CHAT, "images": ["abc"]}, "images"),
        ("/api/chat", {**CHAT, "no_such_field": 1}, "no_such_field"),
        ("/api/generate", {"model": "smollm2", "prompt": 5}, "prompt"),
        ("/api/generate", {"model": "smollm2", "prompt": "hi", "raw": "yes"}, "raw"),
        ("/api/show", {"model": ["smollm2"]}, "model"),
        ("/v1/chat/completions", {"model": 123, "messages": QUESTION}, "model"),
        ("/v1/chat/completions", {"model": "smollm2", "messages": {"role": "user"}}, "messages"),
        ("/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "max_tokens": "a"}, "max_tokens"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(server, path, body, field):
    status, _, data = request(server, "POST", path, body)
    assert status == 400, data
    assert field in data.decode()


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_deeply_nested_json_is_a_400(server, path):
    status, _, data = request(server, "POST", path, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and b"nested too deeply" in data
    status, _, _ = request(server, "POST", "/api/chat", CHAT)
    assert status == 200


def test_host_origin_and_content_type_guards(server):
    port = server.rsplit(":", 1)[1]
    assert request(server, "POST", "/api/chat", CHAT, {"Host": f"localhost:{port}"})[0] == 200
    status, _, data = request(server, "POST", "/api/chat", CHAT, {"Host": f"evil.example:{port}"})
    assert status == 403 and b"DNS rebinding" in data
    assert request(server, "GET", "/api/tags", None, {"Host": "attacker.test"})[0] == 403
    status, _, data = request(server, "POST", "/api/chat", CHAT, {"Origin": "http://evil.example"})
    assert status == 403 and b"evil.example" in data
    assert request(server, "POST", "/api/chat", CHAT, {"Origin": f"http://localhost:{port}"})[0] == 200
    status, _, data = request(server, "POST", "/api/chat", CHAT, {"Content-Type": "text/plain"})
    assert status == 415 and b"application/json" in data
    # A page can also POST a form without a preflight: refused whenever a browser sends it (a browser's POST
    # always carries Origin or Sec-Fetch-*), even from an allowed page. curl -d sends the same type with
    # neither (Ollama's documented examples): read as JSON.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for browser in ({"Origin": f"http://localhost:{port}"}, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}):
        status, _, data = request(server, "POST", "/api/chat", CHAT, {**form, **browser})
        assert status == 415 and b"application/json" in data, browser
    assert request(server, "POST", "/api/chat", CHAT, {**form, "User-Agent": "curl/8.5.0"})[0] == 200
    stats = json.loads(request(server, "GET", "/unillm/stats")[2])
    assert stats["requests"].get("error", 0) == 0  # none of the refused requests reached the model


def test_a_non_streaming_request_whose_client_leaves_is_cancelled(server):
    before = json.loads(request(server, "GET", "/unillm/stats")[2])["requests"].get("cancelled", 0)
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"model": "smollm2", "prompt": "Write a very long story about a dragon.", "stream": False,
                       "options": {"num_predict": 1500, "temperature": 0}}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.5)
    deadline = time.time() + 60
    while time.time() < deadline:
        after = json.loads(request(server, "GET", "/unillm/stats")[2])["requests"].get("cancelled", 0)
        if after > before:
            break
        time.sleep(0.2)
    assert after == before + 1
    assert request(server, "POST", "/api/chat", CHAT)[0] == 200


def test_api_key_body_limit_and_queue_bound():
    proc, url = start_server("--api-key", "s3cret", "--max-body", "4096", "--max-queue", "1")
    key = {"Authorization": "Bearer s3cret"}
    try:
        for method, path in [("GET", "/"), ("GET", "/api/tags"), ("GET", "/unillm/stats"), ("GET", "/v1/models"),
                             ("POST", "/api/chat"), ("POST", "/v1/chat/completions"), ("GET", "/no/such/route")]:
            status, _, _ = request(url, method, path, CHAT if method == "POST" else None)
            assert status == 401, path
        assert request(url, "POST", "/api/chat", CHAT, {"Authorization": "Bearer s3cre"})[0] == 401
        assert request(url, "POST", "/api/chat", CHAT, key)[0] == 200
        # Anthropic's clients send the key as x-api-key, and read errors in Anthropic's shape.
        msg = {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        status, _, data = request(url, "POST", "/v1/messages", msg, {"x-api-key": "wrong"})
        assert status == 401 and json.loads(data) == {"type": "error", "error": {
            "type": "authentication_error", "message": "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)"}}
        assert request(url, "POST", "/v1/messages", msg, {"x-api-key": "s3cret", "anthropic-version": "2023-06-01"})[0] == 200
        # Bodies over the limit: refused from Content-Length, before they are read.
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
        status, _, data = request(url, "POST", "/api/chat", big, key)
        assert status == 413 and b"4096" in data
        # ...and while reading one sent in chunks, without a Content-Length.
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        payload = json.dumps(big).encode()
        conn.request("POST", "/api/chat", body=iter([payload[i:i + 1000] for i in range(0, len(payload), 1000)]),
                     headers={**key, "Content-Type": "application/json"}, encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        # One generation in flight fills a queue of one: the next gets 503 with Retry-After.
        long = {"model": "smollm2", "prompt": "Write a long story.", "stream": False, "options": {"num_predict": 300}}
        first = threading.Thread(target=request, args=(url, "POST", "/api/generate", long, key))
        first.start()
        time.sleep(1.0)
        status, headers, data = request(url, "POST", "/api/chat", CHAT, key)
        first.join()
        assert status == 503 and headers.get("retry-after") == "1" and b"max-queue" in data
        assert request(url, "POST", "/api/chat", CHAT, key)[0] == 200
        # A stream with the key still cancels when its client leaves.
        with socket.create_connection((host, int(port))) as s:
            body = json.dumps({**long, "stream": True, "options": {"num_predict": 1500}}).encode()
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret\r\n"
                      b"Content-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"200 OK" in s.recv(200)
        deadline = time.time() + 60
        while json.loads(request(url, "GET", "/unillm/stats", None, key)[2])["requests"].get("cancelled", 0) < 1:
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        stop(proc)


def test_an_ollama_model_is_not_proxied_into_the_server_itself(write_config):
    port = free_port()
    cfg = write_config(
        "models:\n  - name: loop\n    backend: ollama\n    source: {ollama: smollm2}\n    context_window: 2048\n"
        f"    options: {{host: 'http://localhost:{port}', local_store: never}}\n"
    )
    proc, url = start_server("--config", str(cfg), port=port)
    try:
        t = time.time()
        status, _, data = request(url, "POST", "/api/chat", {**CHAT, "model": "loop"}, timeout=30)
        assert status == 503 and b"this unillm server itself" in data
        assert time.time() - t < 20
        assert request(url, "POST", "/api/chat", CHAT)[0] == 200
    finally:
        stop(proc)
