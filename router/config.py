"""The router's configuration: a YAML file read into frozen, validated dataclasses.

Every mistake is reported with the path of the offending entry (`experiments.fashion.arms.int8.weight: must be
a number > 0, got -1`), unknown keys included, so a typo never silently turns into a default. Whether each
arm's target really exists is checked separately against TorchServe's model list (`check_targets`), because
that needs the server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from router.errors import ConfigError
from serving.client import Target  # one TorchServe model version; version None: its default

LOOPBACK = "127.0.0.1"
# The environment overrides two settings per process, so replicas can share one experiment file: each its own
# state directory (pid file, logs), all of them one database (its URL carries a password: a Secret, not a file).
STATE_DIR_ENV = "ROUTER_STATE_DIR"
DATABASE_URL_ENV = "ROUTER_DATABASE_URL"
SQLITE, POSTGRESQL = "sqlite", "postgresql"


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
class Decision:
    """How the report decides about each candidate (router.verdict): the error rate its claims keep, read as often
    as anyone likes (`alpha`, for all candidates together), and the accuracy difference worth detecting
    (`min_difference`, a fraction: 0.005 is half a point) with probability `power`."""

    alpha: float = 0.05
    power: float = 0.8
    min_difference: float = 0.005


@dataclass(frozen=True)
class Experiment:
    name: str  # the public model name clients call: /predictions/<name>
    arms: tuple[Arm, ...]
    control: str
    salt: str
    shadow: Shadow | None = None
    guardrail: Guardrail | None = None
    decision: Decision = Decision()

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @functools.cached_property  # routing reads it on every request; an experiment never changes once built
    def weights(self) -> dict[str, float]:
        return {arm.name: arm.weight for arm in self.arms}


@dataclass(frozen=True)
class Host:
    """One TorchServe host (a `serving.client.Endpoints`). `key_file` None: that TorchServe runs with token
    authorization off, reachable only by the router (README, threat model)."""

    inference_url: str = f"http://{LOOPBACK}:8080"
    management_url: str = f"http://{LOOPBACK}:8081"
    grpc_target: str = f"{LOOPBACK}:7070"
    key_file: Path | None = Path("runs/torchserve/key_file.json")

    @property
    def name(self) -> str:
        """host:port of its inference API: the host's label in metrics, logs and the admin API."""
        return urlsplit(self.inference_url).netloc


@dataclass(frozen=True)
class Resolve:
    """A DNS name whose addresses are the TorchServe hosts (a Kubernetes headless Service, say), looked up again
    every `every_s`. Hosts found this way run with token authorization off: their key files are out of reach."""

    name: str
    inference_port: int = 8080
    management_port: int = 8081
    grpc_port: int = 7070
    every_s: float = 10.0

    def host(self, address: str) -> Host:
        literal = f"[{address}]" if ":" in address else address  # an IPv6 address in a URL
        return Host(f"http://{literal}:{self.inference_port}", f"http://{literal}:{self.management_port}",
                    f"{literal}:{self.grpc_port}", None)


@dataclass(frozen=True)
class TorchServe:
    """The TorchServe hosts every arm is served by: each serves the same model store (replicas), so any of them
    can answer any target. A fixed list, or the addresses a DNS name resolves to."""

    hosts: tuple[Host, ...] = (Host(),)
    resolve: Resolve | None = None


@dataclass(frozen=True)
class Listen:
    host: str = LOOPBACK
    rest_port: int = 8090
    grpc_port: int = 7090
    # Several replicas on one machine share the ports (SO_REUSEPORT: the kernel spreads connections over them,
    # and a replica that dies leaves the others listening); off, a second router on the same ports fails to start.
    reuse_port: bool = False


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
class StoreSettings:
    """Where the request log, feedback and runtime overrides live: SQLite in `state_dir` (one router process,
    the default) or a PostgreSQL server that every replica shares. The PostgreSQL URL comes from `url`, else
    from the environment variable `url_env` (the way to pass a password)."""

    backend: str = SQLITE
    url: str | None = None
    url_env: str = DATABASE_URL_ENV

    def database_url(self) -> str:
        url = self.url or os.environ.get(self.url_env, "")
        if not url:
            raise ConfigError(f"store: backend {POSTGRESQL} needs a url, or the environment variable {self.url_env}")
        return url


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
    store: StoreSettings = field(default_factory=StoreSettings)
    tokens_path: Path | None = None  # default: <state_dir>/tokens.json; replicas name one shared file
    # TorchServe's default max_request_size: the router refuses nothing that TorchServe would accept
    max_body_bytes: int = 6_553_500
    max_shadow_in_flight: int = 32
    # Requests each front end (REST, gRPC) works on at once; beyond it a request is refused with 503 /
    # RESOURCE_EXHAUSTED at once instead of queueing in memory (see docs/router.md for how it was sized).
    max_in_flight: int = 256
    source: Path | None = None  # the file this was read from, for reloads
    digest: str = ""  # sha256 of that file's bytes: tells whether the file changed (reloads)
    # sha256 of the experiments as parsed: runtime overrides apply to these experiments only. Replicas whose
    # files differ elsewhere (their ports, say) share their overrides through the store.
    experiments_digest: str = ""

    @property
    def database(self) -> Path:
        return self.state_dir / "router.sqlite3"

    @property
    def tokens_file(self) -> Path:
        return self.tokens_path or self.state_dir / "tokens.json"

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
    spec = _check_keys(where, spec, {"arms", "control", "salt", "shadow", "guardrail", "decision"}, {"arms"})
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
    return Experiment(_name(where, name), tuple(arms), control, salt, shadow, guardrail,
                      _decision(f"{where}.decision", spec.get("decision") or {}))


def _decision(where: str, spec: Any) -> Decision:
    spec = _check_keys(where, spec, {"alpha", "power", "min_difference"})
    return Decision(
        alpha=_number(f"{where}.alpha", spec.get("alpha", Decision.alpha), maximum=0.5),
        # Above ½: at ½ or below the power's normal quantile is ≤ 0, and "labels needed" would name counts at
        # which the test more likely misses X than finds it (at a small enough power, no labels at all).
        power=_number(f"{where}.power", spec.get("power", Decision.power), minimum=0.5, maximum=0.999),
        min_difference=_number(f"{where}.min_difference", spec.get("min_difference", Decision.min_difference),
                               maximum=1.0))


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
        elif kind is bool:
            if not isinstance(spec[name], bool):
                raise ConfigError(f"{key}.{name}: must be true or false, got {spec[name]!r}")
            values[name] = spec[name]
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


HOST_FIELDS = {"inference_url": str, "management_url": str, "grpc_target": str, "key_file": Path}


def _host(where: str, spec: Any, required: Collection[str] = ()) -> Host:
    spec = _check_keys(where, spec, set(HOST_FIELDS), required)
    for key in ("inference_url", "management_url"):
        if key in spec and urlsplit(str(spec[key])).scheme not in ("http", "https"):
            raise ConfigError(f"{where}.{key}: must be an http(s) URL, got {spec[key]!r}")
    key_file = spec.get("key_file", Host.key_file)
    return Host(**{key: str(spec[key]) for key in ("inference_url", "management_url", "grpc_target") if key in spec},
                key_file=None if key_file is None else Path(str(key_file)))


def _torchserve(document: dict[str, Any]) -> TorchServe:
    """One host (its fields right under `torchserve`), a list of them (`hosts`), or a DNS name (`resolve`)."""
    spec = _check_keys("torchserve", document.get("torchserve") or {}, {"hosts", "resolve", *HOST_FIELDS})
    forms = [form for form in ("hosts", "resolve") if form in spec] + sorted(set(spec) & set(HOST_FIELDS))[:1]
    if len(forms) > 1:
        raise ConfigError(f"torchserve: give a single host's fields, hosts or resolve, not {' and '.join(forms)}")
    if "resolve" in spec:
        where = "torchserve.resolve"
        r = _check_keys(where, spec["resolve"], {"name", "inference_port", "management_port", "grpc_port", "every_s"},
                        {"name"})
        ports = {key: int(_number(f"{where}.{key}", r[key], minimum=1, inclusive=True, maximum=65535))
                 for key in ("inference_port", "management_port", "grpc_port") if key in r}
        every_s = _number(f"{where}.every_s", r.get("every_s", Resolve.every_s))
        return TorchServe(hosts=(), resolve=Resolve(_name(f"{where}.name", r["name"]), every_s=every_s, **ports))
    if "hosts" in spec:
        if not isinstance(spec["hosts"], list) or not spec["hosts"]:
            raise ConfigError("torchserve.hosts: needs a list of at least one host")
        # Every field, key_file included (a path, or null for a host whose token authorization is off): a host
        # left half-described would silently get the defaults of a TorchServe on this machine.
        hosts = tuple(_host(f"torchserve.hosts[{index}]", host, HOST_FIELDS)
                      for index, host in enumerate(spec["hosts"]))
        names = [host.name for host in hosts]
        if len(set(names)) != len(names):
            raise ConfigError(f"torchserve.hosts: a host is listed twice ({', '.join(names)})")
        return TorchServe(hosts=hosts)
    return TorchServe(hosts=(_host("torchserve", spec),))


def _store(document: dict[str, Any]) -> StoreSettings:
    spec = _check_keys("store", document.get("store") or {}, {"backend", "url", "url_env"})
    backend = spec.get("backend", SQLITE)
    if backend not in (SQLITE, POSTGRESQL):
        raise ConfigError(f"store.backend: must be {SQLITE} or {POSTGRESQL}, got {backend!r}")
    if backend == SQLITE and "url" in spec:
        raise ConfigError(f"store.url: the {SQLITE} store lives in state_dir; a url is for {POSTGRESQL}")
    return StoreSettings(backend, None if spec.get("url") is None else str(spec["url"]),
                         _name("store.url_env", spec.get("url_env", DATABASE_URL_ENV)))


def parse_config(document: Any, source: Path | None = None, digest: str = "") -> RouterConfig:
    document = _check_keys("config", document, {
        "experiments", "torchserve", "listen", "state_dir", "headers", "timeouts", "circuit_breaker",
        "max_body_bytes", "max_shadow_in_flight", "max_in_flight", "request_log", "store", "tokens_file"},
        {"experiments"})
    experiments_spec = document["experiments"]
    if not isinstance(experiments_spec, dict) or not experiments_spec:
        raise ConfigError("experiments: needs at least one experiment")
    experiments = {name: _experiment(name, spec) for name, spec in experiments_spec.items()}
    headers = _check_keys("headers", document.get("headers") or {}, {"sticky", "override"})
    config = RouterConfig(
        experiments=experiments,
        torchserve=_torchserve(document),
        listen=_section(document, "listen", Listen, {"host": str, "rest_port": int, "grpc_port": int,
                                                     "reuse_port": bool}),
        timeouts=_section(document, "timeouts", Timeouts, {"connect_s": float, "request_s": float,
                                                             "shadow_s": float}),
        circuit_breaker=_section(document, "circuit_breaker", CircuitBreakerSettings,
                                 {"failures": int, "reset_s": float}),
        request_log=_request_log(document),
        store=_store(document),
        state_dir=Path(os.environ.get(STATE_DIR_ENV) or str(document.get("state_dir", "runs/router"))),
        tokens_path=None if document.get("tokens_file") is None else Path(str(document["tokens_file"])),
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
        experiments_digest=hashlib.sha256(json.dumps(experiments_spec, sort_keys=True, default=str).encode())
        .hexdigest(),
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
