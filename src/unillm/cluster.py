"""Batch jobs on a Ray cluster: the same JSONL job, its records answered by N replicas on any machines.

Each replica is a Ray actor that holds its own :class:`~unillm.Engine` with the job's model loaded (any
backend), fed by Ray Data (``map_batches`` over an actor pool): Ray places the replicas where the CPUs and
GPUs they ask for are free, restarts one whose process dies and sends its unfinished records again. Only
records and results cross the network; each replica loads the model from its own node's disk or cache.

The driver (the process that runs the job) owns the output file, exactly as in a local job: it appends and
fsyncs each result as it arrives and skips any id it has already written, so ``kill -9`` of the driver at any
moment loses nothing written (run the same command again to resume) and a record that Ray runs twice (after
a replica died) is still written once.

Example:
    $ ray start --head                      # or no cluster at all: --ray alone starts one on this machine
    $ unillm batch docs.jsonl -o out.jsonl -m smollm2 --ray auto --replicas 4
"""

from __future__ import annotations

import gc
import json
import logging
import math
import pickle
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, UnillmError
from .backends import backend_info
from .options import parse_options
from .records import decode_input, embed_each, encode_input, result_record
from .types import BatchResult

if TYPE_CHECKING:
    from .registry import ModelSpec

RAY_HINT = "batch jobs on Ray need the ray extra: pip install 'unillm[ray]'"
#: Records per Ray task when the model does not say: enough to fill llama.cpp's 16 slots.
DEFAULT_BATCH = 16


@dataclass(frozen=True)
class RayConfig:
    """Where and how a job runs on Ray.

    Args:
        address: ``None`` starts a Ray instance on this machine for the job (stopped after it); ``"auto"``
            joins the cluster this machine belongs to (``ray start``); ``"host:6379"`` or
            ``"ray://host:10001"`` joins that cluster. A ``ray.init()`` already made in this process is used
            as it is.
        replicas: actors, each with its own copy of the model.
        batch_size: records per Ray task (a replica runs two tasks at once, so that its engine batches
            across them); default: the model's slots (llama.cpp ``parallel``, vLLM ``max_num_seqs``), at most 64.
        cpus, gpus: each replica's Ray resources, instead of the ones derived from the registry entry.

    Example:
        >>> from unillm.cluster import RayConfig
        >>> RayConfig(address="auto", replicas=4).replicas
        4
    """

    address: str | None = None
    replicas: int = 1
    batch_size: int | None = None
    cpus: float | None = None
    gpus: float | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be at least 1 (got {self.replicas})")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (got {self.batch_size})")


def replica_resources(spec: ModelSpec, cluster_has_gpus: bool, config: RayConfig = RayConfig()) -> dict[str, float]:
    """The Ray resources one replica of ``spec`` asks for (``num_cpus``, ``num_gpus``), as its backend's
    descriptor in :data:`unillm.backends.BACKENDS` says.

    llama.cpp: its ``n_threads`` CPUs (else 1; the replica then runs that many threads), and one GPU where
    the cluster has GPUs and layers are offloaded. vLLM: ``tensor_parallel_size x pipeline_parallel_size``
    GPUs for its worker processes, or none for the replica itself when ``distributed_executor_backend: ray``
    (vLLM then asks Ray for its GPU workers); on a CPU cluster, 1 CPU. transformers: one GPU on a GPU
    cluster unless ``device: cpu``. Ollama: the daemon does the work; the replica only talks to it (1 CPU).
    A ``requires: cuda`` model on a cluster without GPUs is refused here, before any replica starts.
    """
    if spec.requires == "cuda" and not cluster_has_gpus and config.gpus is None:
        raise ConfigError(f"model {spec.name!r} needs a CUDA GPU (requires: cuda) and the Ray cluster has none")
    info = backend_info(spec.backend)
    cpus, gpus = 1.0, 0.0
    if info.options is not None and info.resources is not None:
        cpus, gpus = info.resources(parse_options(info.options, spec), cluster_has_gpus)
    return {"num_cpus": config.cpus if config.cpus is not None else cpus,
            "num_gpus": config.gpus if config.gpus is not None else gpus}


def batch_size_for(spec: ModelSpec, config: RayConfig) -> int:
    """Records per Ray task: the config's, else the model's slots (at most 64), else :data:`DEFAULT_BATCH`."""
    if config.batch_size:
        return config.batch_size
    info = backend_info(spec.backend)
    if info.options is not None and info.slots is not None:
        return min(64, info.slots(parse_options(info.options, spec)))
    return DEFAULT_BATCH


def replica_spec(spec: ModelSpec, cpus: float) -> ModelSpec:
    """The entry a replica loads: a llama.cpp model without ``n_threads`` runs as many threads as the CPUs
    Ray gave the replica (not every CPU of the node, which its neighbours share)."""
    option = backend_info(spec.backend).threads_option
    if option is not None and option not in spec.options and cpus >= 1:
        return spec.model_copy(update={"options": {**spec.options, option: int(cpus)}})
    return spec


class Replica:
    """One Ray Data actor: an Engine with the job's model, answering a batch of records per call."""

    def __init__(
        self, specs: list[ModelSpec], model: str, params: dict[str, Any], embed: bool, fallbacks: bool,
    ) -> None:
        import ray

        from .engine import Engine
        from .registry import Registry

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
        self.model, self.params, self.embed = model, params, embed
        self.engine = Engine(registry=Registry(replica_spec(s, cpus) for s in specs), fallbacks=fallbacks)
        self.load_error: UnillmError | None = None
        try:
            self.engine.load(model)  # now, while Ray starts the other replicas
        except UnillmError as exc:
            # Sent back in place of the first batch's results, for the driver to raise: Ray passes an error
            # raised here, or in a task, to the driver only as text (and restarts a replica that failed here).
            self.load_error = exc

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:

        ids = [str(i) for i in batch["id"]]
        if self.load_error is not None:
            return {"id": ids[:1], "record": [""], "fatal": [pickle.dumps(self.load_error)]}
        inputs = [decode_input(s) for s in batch["input"]]
        if self.embed:
            results = embed_each(self.engine, self.model, inputs, lambda _: None, progress=False)
        else:
            results = self.engine.batch(self.model, inputs, progress=False, **self.params)
        records = []
        for rid, res in zip(ids, results, strict=True):
            assert isinstance(res, BatchResult)
            records.append(json.dumps(result_record(rid, self.model, res), ensure_ascii=False))
        return {"id": ids, "record": records, "fatal": [b""] * len(ids)}


def _connect(address: str | None) -> bool:
    """Start or join Ray; True when this call started the session (and the job ends it)."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(RAY_HINT) from exc
    if ray.is_initialized():
        return False
    if address not in (None, "auto"):
        _check_reachable(address)
    try:
        # "local": a new instance for this job, even where a cluster runs on this machine or RAY_ADDRESS is set.
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from exc
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds where Ray would retry an unreachable cluster for minutes."""
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"the Ray address {address!r} is not 'auto', 'host:port' or 'ray://host:port'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({exc})") from exc


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job's own bar counts records as the driver writes them
    ctx.execution_options.preserve_order = False  # results come back as they are ready
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def ray_results(
    specs: list[ModelSpec], model: str, todo: list[tuple[str, Any]], params: dict[str, Any], embed: bool,
    config: RayConfig, fallbacks: bool = False,
) -> Iterator[dict[str, Any]]:
    """Run ``todo`` ((id, chat input) pairs) on Ray; yield each result record as the driver receives it.
    ``specs`` are the model's entry and its fallbacks (``Registry.fallback_chain``), which the replicas use
    as the driver's Engine would with ``fallbacks``.

    The Ray session this starts is shut down when the iterator ends or is closed."""
    if not todo:
        return
    started = _connect(config.address)
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    try:
        _quiet_ray_data()
        spec = specs[0]
        resources = replica_resources(spec, ray.cluster_resources().get("GPU", 0) > 0, config)
        size = batch_size_for(spec, config)
        items = [{"id": rid, "input": encode_input(item)} for rid, item in todo]
        blocks = max(1, math.ceil(len(items) / size))
        source = ray.data.from_items(items, override_num_blocks=blocks)
        with warnings.catch_warnings():
            # Ray 2.60 warns that these actor options will move; they are how a poison record is bounded.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
            answered = source.map_batches(
                Replica,
                batch_size=size,
                batch_format="numpy",
                fn_constructor_kwargs={"specs": specs, "model": model, "params": params, "embed": embed,
                                       "fallbacks": fallbacks},
                # Two tasks run at once on a replica, so that its engine batches across them, and no more
                # wait there: the first replica ready would otherwise take every task of a small job.
                compute=ActorPoolStrategy(size=min(config.replicas, blocks), max_concurrent_calls_per_actor=2,
                                          max_tasks_in_flight_per_actor=2, enable_true_multi_threading=True),
                # A dead replica is restarted and its task sent again; a record that kills every replica it
                # meets stops the job after a few tries instead of forever.
                max_restarts=-1,
                max_task_retries=3,
                num_cpus=resources["num_cpus"],
                num_gpus=resources["num_gpus"],
            )
        rows = iter(answered.iter_rows())
        try:
            for row in rows:
                if row["fatal"]:
                    raise pickle.loads(row["fatal"])  # noqa: S301 (our own replica's error, in our own job)
                yield json.loads(row["record"])
        except ray.exceptions.RayError as exc:
            raise _job_error(model, exc) from exc
        finally:
            # Stop Ray Data's executor and its prefetch thread before ray.shutdown(): a thread of theirs that
            # touches Ray after it ends this process (before the job's error is even printed).
            getattr(rows, "close", lambda: None)()
            del rows
            gc.collect()
    finally:
        if started:
            ray.shutdown()


def _job_error(model: str, exc: BaseException) -> UnillmError:
    """The error that stopped a Ray job: the replica's own unillm error where there is one."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        inner = getattr(node, "cause", None)  # a RayTaskError's own exception, unpickled
        if isinstance(inner, UnillmError):
            return inner
        node = inner if isinstance(inner, BaseException) else (node.__cause__ or node.__context__)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnillmError(f"the Ray job for model {model!r} stopped: {first}")

