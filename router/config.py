"""The router's configuration: a YAML file read into frozen, validated dataclasses.

Every mistake is reported with the path of the offending entry (`experiments.fashion.arms.int8.weight: must be
a number > 0, got -1`), unknown keys included, so a typo never silently turns into a default. Whether each
arm's target really exists is checked separately against TorchServe's model list (`check_targets`), because
that needs the server.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from router.errors import ConfigError
from serving.client import Target  # one TorchServe model version; version None: its default

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Arm:
    name: str
    target: Target
    weight: float


@dataclass(frozen=True)
class Shadow:
    """A target that gets a sampled copy of the experiment's traffic; its answers are compared, never returned."""

    target: Target
    sample: float  # fraction of live requests copied, in (0, 1]


@dataclass(frozen=True)
class Guardrail:
    """Roll every candidate back to control when one breaches a limit over the last `window_s` seconds."""

    max_error_rate: float | None = None
    max_p99_ms: float | None = None
    min_requests: int = 100
    window_s: float = 60.0


@dataclass(frozen=True)
class Experiment:
    name: str  # the public model name clients call: /predictions/<name>
    arms: tuple[Arm, ...]
    control: str
    salt: str
    shadow: Shadow | None = None
    guardrail: Guardrail | None = None

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @functools.cached_property  # routing reads it on every request; an experiment never changes once built
    def weights(self) -> dict[str, float]:
        return {arm.name: arm.weight for arm in self.arms}


@dataclass(frozen=True)
class TorchServe:
    inference_url: str = f"http://{LOOPBACK}:8080"
    management_url: str = f"http://{LOOPBACK}:8081"
    grpc_target: str = f"{LOOPBACK}:7070"
    key_file: Path = Path("runs/torchserve/key_file.json")


@dataclass(frozen=True)
class Listen:
    host: str = LOOPBACK
    rest_port: int = 8090
    grpc_port: int = 7090


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 1.0
    request_s: float = 10.0
    shadow_s: float = 5.0


@dataclass(frozen=True)
class CircuitBreakerSettings:
    failures: int = 5  # consecutive failures that open the circuit
    reset_s: float = 10.0  # how long an open circuit stays open before one trial request


@dataclass(frozen=True)
class RequestLog:
    """Bounds of the request log (router.store). Retention deletes, per table, rows older than `retention_days`
    and all but the newest `max_rows` (null in the file: no such bound); at most `queue_limit` rows wait for
    the writer (shadow rows and events are shed beyond half of it, requests refused with 503 beyond all of it)."""

    retention_days: float | None = 30.0
    max_rows: int | None = 2_000_000  # ~0.43 GB of requests at ~215 bytes a row with indexes (loadtest.request_log)
    queue_limit: int = 10_000


@dataclass(frozen=True)
class RouterConfig:
    experiments: dict[str, Experiment]
    torchserve: TorchServe = field(default_factory=TorchServe)
    listen: Listen = field(default_factory=Listen)
    state_dir: Path = Path("runs/router")
    sticky_header: str = "X-User-Id"
    override_header: str = "X-Arm"
    timeouts: Timeouts = field(default_factory=Timeouts)
    circuit_breaker: CircuitBreakerSettings = field(default_factory=CircuitBreakerSettings)
    request_log: RequestLog = field(default_factory=RequestLog)
    # TorchServe's default max_request_size: the router refuses nothing that TorchServe would accept
    max_body_bytes: int = 6_553_500
    max_shadow_in_flight: int = 32
    # Requests each front end (REST, gRPC) works on at once; beyond it a request is refused with 503 /
    # RESOURCE_EXHAUSTED at once instead of queueing in memory (see docs/router.md for how it was sized).
    max_in_flight: int = 256
    source: Path | None = None  # the file this was read from, for reloads
    digest: str = ""  # sha256 of that file's bytes: tells whether runtime overrides still apply to it

    @property
    def database(self) -> Path:
        return self.state_dir / "router.sqlite3"

    @property
    def tokens_file(self) -> Path:
        return self.state_dir / "tokens.json"

    def targets(self) -> set[Target]:
        targets = {arm.target for experiment in self.experiments.values() for arm in experiment.arms}
        return targets | {e.shadow.target for e in self.experiments.values() if e.shadow is not None}


def _check_keys(where: str, mapping: Any, allowed: Collection[str], required: Collection[str] = ()) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(set(required) - set(mapping))
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    return mapping


def _number(where: str, value: Any, minimum: float = 0.0, inclusive: bool = False, maximum: float = math.inf) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not inclusive) or value > maximum:
        bound = f"{'>=' if inclusive else '>'} {minimum:g}" + (f" and <= {maximum:g}" if maximum < math.inf else "")
        raise ConfigError(f"{where}: must be a number {bound}, got {value!r}")
    return float(value)


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.strip() != value:
        raise ConfigError(f"{where}: must be a non-empty name without '/' or spaces, got {value!r}")
    return value


def _target(where: str, spec: Any, extra: Collection[str] = ()) -> Target:
    spec = _check_keys(where, spec, {"model", "version", *extra}, {"model"})
    version = spec.get("version")
    if version is not None and not isinstance(version, str | int | float):
        raise ConfigError(f"{where}.version: must be a string such as \"1.0\", got {version!r}")
    return Target(_name(f"{where}.model", spec["model"]), None if version is None else str(version))


def _experiment(name: str, spec: Any) -> Experiment:
    where = f"experiments.{name}"
    spec = _check_keys(where, spec, {"arms", "control", "salt", "shadow", "guardrail"}, {"arms"})
    arms_spec = spec["arms"]
    if not isinstance(arms_spec, dict) or not arms_spec:
        raise ConfigError(f"{where}.arms: needs a mapping of at least one arm")
    arms = []
    for arm_name, arm_spec in arms_spec.items():
        arm_where = f"{where}.arms.{arm_name}"
        target = _target(arm_where, arm_spec, {"weight"})
        if "weight" not in arm_spec:
            raise ConfigError(f"{arm_where}: missing key 'weight'")
        arms.append(Arm(_name(arm_where, arm_name), target, _number(f"{arm_where}.weight", arm_spec["weight"])))
    control = spec.get("control", arms[0].name)
    if control not in arms_spec:
        raise ConfigError(f"{where}.control: {control!r} is not one of its arms ({', '.join(arms_spec)})")
    shadow = None
    if spec.get("shadow") is not None:
        shadow_spec = spec["shadow"]
        target = _target(f"{where}.shadow", shadow_spec, {"sample"})
        sample = _number(f"{where}.shadow.sample", shadow_spec.get("sample", 1.0), maximum=1.0)
        shadow = Shadow(target, sample)
    guardrail = None
    if spec.get("guardrail") is not None:
        gw = f"{where}.guardrail"
        g = _check_keys(gw, spec["guardrail"], {"max_error_rate", "max_p99_ms", "min_requests", "window_s"})
        if "max_error_rate" not in g and "max_p99_ms" not in g:
            raise ConfigError(f"{gw}: set max_error_rate, max_p99_ms or both")
        guardrail = Guardrail(
            max_error_rate=None if "max_error_rate" not in g else _number(f"{gw}.max_error_rate", g["max_error_rate"],
                                                                          inclusive=True, maximum=1.0),
            max_p99_ms=None if "max_p99_ms" not in g else _number(f"{gw}.max_p99_ms", g["max_p99_ms"]),
            min_requests=int(_number(f"{gw}.min_requests", g.get("min_requests", 100), minimum=1, inclusive=True)),
            window_s=_number(f"{gw}.window_s", g.get("window_s", 60.0)),
        )
    salt = spec.get("salt", name)
    if not isinstance(salt, str) or not salt:
        raise ConfigError(f"{where}.salt: must be a non-empty string")
    return Experiment(_name(where, name), tuple(arms), control, salt, shadow, guardrail)


def _section(document: dict[str, Any], key: str, cls: type, fields: dict[str, type]) -> Any:
    spec = _check_keys(key, document.get(key) or {}, set(fields))
    values: dict[str, Any] = {}
    for name, kind in fields.items():
        if name not in spec:
            continue
        if kind is float:
            values[name] = _number(f"{key}.{name}", spec[name])
        elif kind is int:
            values[name] = int(_number(f"{key}.{name}", spec[name], minimum=1, inclusive=True))
        elif kind is Path:
            values[name] = Path(str(spec[name]))
        else:
            values[name] = str(spec[name])
    return cls(**values)


def _request_log(document: dict[str, Any]) -> RequestLog:
    """Like `_section`, except that a retention bound may be null: that bound is off."""
    spec = _check_keys("request_log", document.get("request_log") or {}, {"retention_days", "max_rows", "queue_limit"})
    days = spec.get("retention_days", RequestLog.retention_days)
    rows = spec.get("max_rows", RequestLog.max_rows)
    return RequestLog(
        retention_days=None if days is None else _number("request_log.retention_days", days),
        max_rows=None if rows is None else int(_number("request_log.max_rows", rows, minimum=1, inclusive=True)),
        queue_limit=int(_number("request_log.queue_limit", spec.get("queue_limit", RequestLog.queue_limit),
                                minimum=1, inclusive=True)))


def parse_config(document: Any, source: Path | None = None, digest: str = "") -> RouterConfig:
    document = _check_keys("config", document, {
        "experiments", "torchserve", "listen", "state_dir", "headers", "timeouts", "circuit_breaker",
        "max_body_bytes", "max_shadow_in_flight", "max_in_flight", "request_log"}, {"experiments"})
    experiments_spec = document["experiments"]
    if not isinstance(experiments_spec, dict) or not experiments_spec:
        raise ConfigError("experiments: needs at least one experiment")
    experiments = {name: _experiment(name, spec) for name, spec in experiments_spec.items()}
    headers = _check_keys("headers", document.get("headers") or {}, {"sticky", "override"})
    config = RouterConfig(
        experiments=experiments,
        torchserve=_section(document, "torchserve", TorchServe, {"inference_url": str, "management_url": str,
                                                                   "grpc_target": str, "key_file": Path}),
        listen=_section(document, "listen", Listen, {"host": str, "rest_port": int, "grpc_port": int}),
        timeouts=_section(document, "timeouts", Timeouts, {"connect_s": float, "request_s": float,
                                                             "shadow_s": float}),
        circuit_breaker=_section(document, "circuit_breaker", CircuitBreakerSettings,
                                 {"failures": int, "reset_s": float}),
        request_log=_request_log(document),
        state_dir=Path(str(document.get("state_dir", "runs/router"))),
        sticky_header=_name("headers.sticky", headers.get("sticky", "X-User-Id")),
        override_header=_name("headers.override", headers.get("override", "X-Arm")),
        max_body_bytes=int(_number("max_body_bytes", document.get("max_body_bytes", RouterConfig.max_body_bytes),
                                   minimum=1)),
        max_shadow_in_flight=int(_number("max_shadow_in_flight", document.get(
            "max_shadow_in_flight", RouterConfig.max_shadow_in_flight), minimum=1, inclusive=True)),
        max_in_flight=int(_number("max_in_flight", document.get("max_in_flight", RouterConfig.max_in_flight),
                                  minimum=1, inclusive=True)),
        source=source,
        digest=digest,
    )
    if config.sticky_header.lower() == config.override_header.lower():
        raise ConfigError("headers: the sticky and override headers must differ")
    return config


def load_config(path: Path) -> RouterConfig:
    """Read and validate the experiment file (targets are checked against TorchServe separately)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from error
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    try:
        return parse_config(document, path.resolve(), hashlib.sha256(raw).hexdigest())
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def check_targets(config: RouterConfig, available: dict[str, set[str]]) -> None:
    """Every arm and shadow must name a model (and version) TorchServe serves: {model: {versions}}."""
    for experiment in config.experiments.values():
        named = [(f"experiments.{experiment.name}.arms.{arm.name}", arm.target) for arm in experiment.arms]
        if experiment.shadow is not None:
            named.append((f"experiments.{experiment.name}.shadow", experiment.shadow.target))
        for where, target in named:
            if target.model not in available:
                known = ", ".join(sorted(available)) or "none"
                raise ConfigError(f"{where}: TorchServe serves no model {target.model!r} (it serves: {known})")
            if target.version is not None and target.version not in available[target.model]:
                versions = ", ".join(sorted(available[target.model]))
                raise ConfigError(f"{where}: {target.model} has no version {target.version!r} (it has: {versions})")


def with_weights(experiment: Experiment, weights: dict[str, float]) -> Experiment:
    """The experiment with new arm weights (0 drains an arm); unknown arms or no positive weight are errors."""
    unknown = sorted(set(weights) - {arm.name for arm in experiment.arms})
    if unknown:
        raise ConfigError(f"experiment {experiment.name!r} has no arm {unknown[0]!r} "
                          f"(arms: {', '.join(arm.name for arm in experiment.arms)})")
    checked = {name: _number(f"weights.{name}", value, inclusive=True) for name, value in weights.items()}
    arms = tuple(replace(arm, weight=checked.get(arm.name, arm.weight)) for arm in experiment.arms)
    if not any(arm.weight > 0 for arm in arms):
        raise ConfigError(f"experiment {experiment.name!r}: at least one arm needs a weight > 0")
    return replace(experiment, arms=arms)
