"""``unillm recommend``: the model selection guide's decisions, applied to this machine.

The guide's decision tree lives in ``guide.yaml`` beside this module, one rule per branch, each quoting
the guide. :func:`guide_pick` walks it; :func:`recommend` then checks the pick against this machine and,
where it cannot run, follows the pick's registry fallbacks ("migration paths: change only the model name").

Example:
    >>> from unillm.recommend import guide_pick
    >>> guide_pick("code", users=20).model
    'qwen-coder-vllm'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml

from .errors import InvalidRequestError
from .registry import ModelSpec, Registry

Task = Literal["code", "chat", "content", "research", "batch"]
Stage = Literal["prototype", "testing", "production"]
TASKS = ("code", "chat", "content", "research", "batch")
STAGES = ("prototype", "testing", "production")
EMBEDDED = "smollm2"


@functools.lru_cache(maxsize=1)
def guide_rules() -> dict[str, Any]:
    return yaml.safe_load(resources.files("unillm").joinpath("guide.yaml").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Pick:
    """The guide's own answer: a registry model, or a backend ("any GGUF model on llama.cpp")."""

    model: str | None
    backend: str | None
    guide: str


def guide_pick(task: str, users: int = 1, stage: str = "prototype") -> Pick:
    """The first rule of the task's branch whose conditions hold."""
    if task not in TASKS:
        raise InvalidRequestError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if stage not in STAGES:
        raise InvalidRequestError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    if users < 1:
        raise InvalidRequestError(f"users must be at least 1, got {users}")
    for rule in guide_rules()["tree"][task]:
        when = rule["when"]
        if users < when.get("users_min", 1) or users > when.get("users_max", 10**9):
            continue
        if "stages" in when and stage not in when["stages"]:
            continue
        return Pick(rule.get("model"), rule.get("backend"), rule["guide"])
    raise AssertionError(f"guide.yaml has no catch-all rule for {task}")  # the data always ends with one


def hardware_advice(gpu_gb: float) -> str:
    for rule in guide_rules()["hardware"]:
        if gpu_gb <= rule["when"].get("gpu_gb_max", float("inf")):
            return str(rule["advice"])
    raise AssertionError("guide.yaml has no catch-all hardware rule")


@dataclass
class Recommendation:
    """What to use here, what the guide would pick, and why."""

    model: str
    guide_model: str | None
    reasons: list[str] = field(default_factory=list)
    fallback_used: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "guide_model": self.guide_model, "reasons": self.reasons, "fallback_used": self.fallback_used}


def recommend(
    task: str,
    users: int = 1,
    stage: str = "prototype",
    *,
    registry: Registry | None = None,
    gpu_gb: float | None = None,
    why_not: Callable[[ModelSpec], str | None] | None = None,
) -> Recommendation:
    """Apply the guide to this machine. ``gpu_gb`` and ``why_not`` default to this machine's facts."""
    from .system import gpus, why_not_runnable

    registry = registry if registry is not None else Registry.load()
    why_not = why_not or why_not_runnable
    if gpu_gb is None:
        gpu_gb = max((g.memory_gb for g in gpus()), default=0.0)
    pick = guide_pick(task, users, stage)
    reasons = [f"guide: {pick.guide}", f"hardware: {hardware_advice(gpu_gb)} (this machine: "
               + (f"{gpu_gb:.0f} GB GPU)" if gpu_gb else "no NVIDIA GPU)")]
    if pick.model is not None:
        candidates = [pick.model]
    else:  # a backend: the registry's models of it that are meant for the task
        candidates = [s.name for s in registry if s.backend == pick.backend and (task in s.use_for or not s.use_for)]
    first = candidates[0] if candidates else None
    # The candidates first, then their fallbacks in the order an Engine with fallbacks tries them.
    chains = [registry.fallback_chain(name) for name in candidates]
    seen: set[str] = set()
    for spec in [chain[0] for chain in chains] + [s for chain in chains for s in chain[1:]]:
        if spec.name in seen:
            continue
        seen.add(spec.name)
        reason = why_not(spec)
        if reason is None:
            used_fallback = spec.name != first
            if used_fallback:
                reasons.append(f"{spec.name} is the first model along the fallbacks of {first} that runs here")
                reasons.append(f"Engine(fallbacks=True) sends calls for {first!r} to it automatically")
            return Recommendation(spec.name, pick.model or first, reasons, used_fallback)
        reasons.append(f"{spec.name} cannot run here: {reason}")
    reasons.append(f"nothing along that path runs here; the embedded default {EMBEDDED!r} runs anywhere")
    return Recommendation(EMBEDDED, pick.model or first, reasons, True)
