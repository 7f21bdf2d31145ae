"""Settings: one frozen object per process, read from OPD_* environment variables.

CLI flags override the environment (`Settings.load(overrides)`). A bad value fails at
start-up with a ConfigError naming the variable, its value and the reason. This module
reads configuration only; it starts nothing.

Every field says which `opd` processes read it (`json_schema_extra=by(...)`); docs/configuration.md's
table is generated from these fields (`python -m opd_services.config_doc --write`) and a test
fails when it drifts. An OPD_* variable read outside Settings goes in READ_ELSEWHERE, else the
same test fails.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from opd_client.tls import TLS, check_pair
from opd_services.errors import ConfigError, InvalidRequest


# The processes that read a setting (the `opd` subcommands; `opd demo` runs serve, scorer and
# train as child processes that inherit its environment).
SERVE, SCORER, TRAIN, DEMO = "opd serve", "opd scorer", "opd train", "opd demo"
EXPERIMENTS, FLEET = "opd experiments", "opd fleet check"

# OPD_* variables some module reads without Settings: {name: "who reads it: what it means"}.
READ_ELSEWHERE: dict[str, str] = {}

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def by(*processes: str) -> dict:
    """A field's `json_schema_extra`: the processes that read it (none: declared but unused)."""
    return {"read_by": processes}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_", frozen=True, extra="forbid")

    # --- teacher model and engine ---
    model: str | None = Field(None, description="Path of an HF-format model directory; unset = the embedded default teacher.", json_schema_extra=by(SERVE))
    engine: Literal["torch", "vllm", "uniform"] = Field("torch", description="Scoring engine: torch (default), vllm, or uniform (zero-cost test engine).", json_schema_extra=by(SERVE))
    device: str = Field("auto", description="torch device for the torch engine: auto (cuda if present, else cpu), cpu, cuda, cuda:N.", json_schema_extra=by(SERVE))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype, the same meaning on every engine; auto = the checkpoint's dtype on CPU (float32 if it declares none), bfloat16 on CUDA unless the checkpoint is float16/bfloat16.", json_schema_extra=by(SERVE))
    vllm_args: dict = Field(default_factory=dict, description="vLLM engine only: extra AsyncEngineArgs as JSON, e.g. '{\"gpu_memory_utilization\": 0.5, \"tensor_parallel_size\": 2}'.", json_schema_extra=by(SERVE))
    vllm_prefix_cache: bool = Field(False, description="vLLM engine only: let scoring requests read vLLM's prefix cache (docs/vllm.md#prefix-caching: exact, but it saves work only where a prompt's length is not a multiple of vLLM's block size, so it is off by default).", json_schema_extra=by(SERVE))
    vllm_full_vocab_limit: int = Field(8192, ge=0, description="vLLM engine only: largest vocabulary for which temperature != 1, candidate_ids and entropy are served (they need the whole distribution per position from vLLM); above it those requests get 422 (use the torch engine).", json_schema_extra=by(SERVE))
    teacher_name: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="This teacher's name in a deployment of several (`opd serve`); every answer's model identity carries it, and a request naming another teacher gets 404 / NOT_FOUND.", json_schema_extra=by(SERVE))
    cache_dir: Path = Field(Path("~/.cache/opd"), validate_default=True, description="Where built checkpoints are cached: the embedded default teacher (`opd serve` without OPD_MODEL), the task students and teachers (`opd train` without --student, `opd demo`).", json_schema_extra=by(SERVE, TRAIN, DEMO))

    # --- network ---
    host: str = Field("127.0.0.1", description="Address the teacher's HTTP and gRPC servers bind, and the scorer's /metrics (0.0.0.0 in containers).", json_schema_extra=by(SERVE, SCORER))
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = pick a free one).", json_schema_extra=by(SERVE))
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).", json_schema_extra=by(SERVE))
    teacher_url: str = Field("grpc://127.0.0.1:50051", description="Teacher address for scorers and trainers: grpc://HOST:PORT or http://HOST:PORT; several replicas comma-separated (grpc://h1:50051,h2:50051) or a DNS name standing for them (grpc+dns://NAME:50051, http+dns://NAME:8000).", json_schema_extra=by(SCORER, TRAIN, FLEET))
    teachers: str | None = Field(None, description="Scorers, several teachers: 'NAME=URL;NAME=URL' (URL as in OPD_TEACHER_URL), e.g. 'math=grpc://a:50051,b:50051;code=grpc://c:50051'. The first is the default; a rollout (or its experiment) names another. Unset = one teacher, OPD_TEACHER_URL.", json_schema_extra=by(SCORER, FLEET))
    replica_check_rate: float = Field(0.001, ge=0, le=1, description="Scorers: share of scored sequences also sent to every replica of their teacher to compare logprobs (opd_teacher_replica_max_abs_diff); 0 = off.", json_schema_extra=by(SCORER))
    redis_url: str | None = Field(None, description="Redis/Valkey holding the queue and the experiments registry; unset: `opd scorer` starts an embedded Valkey, `opd serve` runs without tenancy, `opd train` (queue mode), `opd experiments` and `opd fleet check` stop with an error.", json_schema_extra=by(SERVE, SCORER, TRAIN, EXPERIMENTS, FLEET))
    teacher_api_key: str | None = Field(None, description="Scorer: the key it sends to a teacher that requires keys (OPD_AUTH on, experiments exist), e.g. the admin key; unset = none.", json_schema_extra=by(SCORER, FLEET))

    # --- TLS (docs/security.md): the server's certificate turns on TLS for HTTP and gRPC together ---
    tls_cert: Path | None = Field(None, description="Server: PEM certificate chain; set with OPD_TLS_KEY to serve https:// and grpcs:// (both surfaces).", json_schema_extra=by(SERVE))
    tls_key: Path | None = Field(None, description="Server: PEM private key of OPD_TLS_CERT.", json_schema_extra=by(SERVE))
    tls_client_ca: Path | None = Field(None, description="Server: PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).", json_schema_extra=by(SERVE))
    tls_ca: Path | None = Field(None, description="Scorer and trainer (clients): PEM CA bundle that signs the teacher's certificate; unset = the system's trust store.", json_schema_extra=by(SCORER, TRAIN, FLEET))
    tls_client_cert: Path | None = Field(None, description="Scorer and trainer (clients): PEM certificate presented to a teacher that requires mutual TLS.", json_schema_extra=by(SCORER, TRAIN, FLEET))
    tls_client_key: Path | None = Field(None, description="Scorer and trainer (clients): PEM private key of OPD_TLS_CLIENT_CERT.", json_schema_extra=by(SCORER, TRAIN, FLEET))

    # --- limits (bad input is refused with 422 / INVALID_ARGUMENT) ---
    max_top_k: int = Field(20, ge=0, le=1024, description="Largest top_k a request may ask for.", json_schema_extra=by(SERVE))
    max_candidates: int = Field(256, ge=1, description="Most candidate ids per scored position.", json_schema_extra=by(SERVE))
    max_request_sequences: int = Field(1024, ge=1, description="Most sequences in one request.", json_schema_extra=by(SERVE))
    max_request_tokens: int = Field(262_144, ge=2, description="Most tokens (summed over sequences) in one request.", json_schema_extra=by(SERVE))
    max_generate_tokens: int = Field(1024, ge=1, description="Largest max_tokens a generate request may ask for.", json_schema_extra=by(SERVE))
    max_body_bytes: int = Field(64 << 20, ge=1024, description="Largest request body in bytes (64 MiB by default), HTTP and gRPC; larger ones are refused unread.", json_schema_extra=by(SERVE))
    http_body_timeout_s: float = Field(30.0, gt=0, description="An HTTP request body must arrive in full within this many seconds of the request's start; a slower client gets 408 and its connection is closed.", json_schema_extra=by(SERVE))

    # --- batching ---
    max_batch_tokens: int = Field(16_384, ge=16, description="Token budget of one engine batch (padded tokens); it also bounds how long one experiment's batch can delay another's request.", json_schema_extra=by(SERVE))
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a non-full batch waits, from its first request, for more (a burst of small concurrent requests then becomes one batch; measured in bench/scoring.py R2).", json_schema_extra=by(SERVE))
    batching: bool = Field(True, description="Merge concurrent requests into batches (off only to measure its effect).", json_schema_extra=by(SERVE))
    prefix_sharing: bool = Field(True, description="torch engine: sequences of a batch that share a prefix run it once (off only to measure its effect).", json_schema_extra=by(SERVE))
    cpu_onednn: bool = Field(True, description="torch engine on CPU, float32: linear layers run oneDNN's matmul instead of torch's default (MKL, which leaves AVX-512 unused on AMD CPUs: 1.6x slower forward measured here); off only to compare.", json_schema_extra=by(SERVE))
    malloc_reuse: bool = Field(True, description="Linux (glibc): `opd serve` sets malloc to reuse freed memory (one arena, no mmap for large blocks, no trimming), so each batch's large activations are not page-faulted in again (a quarter of an unshared forward's time on the 2-core CPU VM); free pages go back to the OS at most once a minute. Off: glibc's defaults.", json_schema_extra=by(SERVE))
    prefix_cache_mb: float | None = Field(None, ge=0, description="torch engine: budget of the prefix KV cache across requests (LRU, activations only, keyed by the token block); unset = sized for the machine (1/16 of RAM up to 2048 MB on CPU, 1/10 of the GPU's memory on CUDA); 0 = off.", json_schema_extra=by(SERVE))

    # --- lifecycle ---
    drain_timeout_s: float = Field(25.0, ge=0, description="On SIGTERM, how long in-flight requests may finish; keep below the k8s grace period.", json_schema_extra=by(SERVE, SCORER))
    log_level: str = Field("info", description="Python log level: debug, info, warning, error or critical (any case).", json_schema_extra=by(SERVE, SCORER, TRAIN))

    # --- queue and scorer (opd scorer) ---
    queue_max_backlog: int | None = Field(None, ge=1, description="`opd train` in queue mode: the most rollouts of its experiment waiting or being scored (undelivered + pending); over it a push waits for the scorers, then fails with QueueFull. Unset = no limit. (A producer of your own sets `RolloutProducer(max_backlog=...)`.)", json_schema_extra=by(TRAIN))
    queue_reclaim_idle_s: float = Field(30.0, gt=0, description="A rollout pending this long with its scorer silent is reclaimed (XAUTOCLAIM) by another scorer; keep above the slowest teacher call. (Trainers reclaim scored entries after their consumer's own 60 s.)", json_schema_extra=by(SCORER))
    scorer_batch_size: int = Field(128, ge=1, le=4096, description="Rollouts a scorer loop reads and sends to the teacher per request (keep under the teacher's max_request_sequences).", json_schema_extra=by(SCORER))
    scorer_concurrency: int = Field(2, ge=1, le=64, description="Scorer loops per process (threads, one consumer each): one's Redis I/O overlaps another's teacher call.", json_schema_extra=by(SCORER))
    scorer_block_ms: int = Field(200, ge=1, le=10_000, description="How long an idle scorer loop blocks on XREADGROUP before looking again.", json_schema_extra=by(SCORER))
    scorer_backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between retries while the teacher is unavailable (exponential backoff with jitter up to this).", json_schema_extra=by(SCORER))
    scorer_teacher_timeout_s: float = Field(120.0, gt=0, description="Deadline of one teacher request made by a scorer.", json_schema_extra=by(SCORER))
    scorer_discovery_s: float = Field(2.0, gt=0, description="How often a scorer looks for new experiments (SCAN for opd:{*}:rollouts).", json_schema_extra=by(SCORER))
    scorer_gauges_s: float = Field(2.0, gt=0, description="How often the scorer refreshes the opd_queue_backlog / opd_queue_pending gauges.", json_schema_extra=by(SCORER))
    trainer_metrics_port: int = Field(9101, ge=0, le=65535, description="Port of `opd train`'s own /metrics (Prometheus); 0 = none.", json_schema_extra=by(TRAIN))
    scorer_metrics_port: int = Field(9100, ge=0, le=65535, description="Port of the scorer's own /metrics (Prometheus); 0 = none.", json_schema_extra=by(SCORER))

    # --- tenancy ---
    auth: Literal["on", "off", "auto"] = Field("auto", description="on: requests need an experiment's key; off: no keys, everything is accounted to `default` (logged loudly); auto: on once an experiment exists.", json_schema_extra=by(SERVE))
    admin_key: str | None = Field(None, description="Key that manages experiments (admin HTTP routes); empty = none.", json_schema_extra=by(SERVE))
    acl_sync_s: float = Field(30.0, gt=0, description="How often the teacher re-creates experiments' Redis ACL users from the registry (they live in Redis memory and vanish when Redis restarts).", json_schema_extra=by(SERVE))

    @field_validator("cache_dir")
    @classmethod
    def _home(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.lower() not in LOG_LEVELS:
            raise ValueError(f"must be a log level: one of {', '.join(LOG_LEVELS)} (any case)")
        return v.lower()

    @field_validator("teacher_url")
    @classmethod
    def _url(cls, v: str) -> str:
        from opd_client.targets import parse_target
        if "://" not in v:
            raise ValueError("must start with a scheme: grpc://, grpcs://, http://, https://, grpc+dns:// or http+dns://")
        try:
            parse_target(v)
        except InvalidRequest as e:
            raise ValueError(e.reason) from None
        return v

    @field_validator("teachers")
    @classmethod
    def _teachers(cls, v: str | None) -> str | None:
        from opd_client.teachers import parse_teachers
        if not v:                    # "" (compose's ${OPD_TEACHERS:-}) = unset
            return None
        try:
            return parse_teachers(v) and v
        except InvalidRequest as e:
            raise ValueError(e.reason) from None

    def teacher_urls(self) -> dict[str, str]:
        """{teacher name: URL}, the default first: OPD_TEACHERS, else {"default": OPD_TEACHER_URL}."""
        from opd_client.teachers import parse_teachers
        return parse_teachers(self.teachers) if self.teachers else {"default": self.teacher_url}

    @property
    def tls(self) -> bool:
        """True when the teacher serves TLS (https:// and grpcs://)."""
        return self.tls_cert is not None

    def client_tls(self) -> TLS | None:
        """The TLS options a scorer or trainer hands to TeacherClient (None: plaintext or system CAs)."""
        if self.tls_ca is None and self.tls_client_cert is None:
            return None
        return TLS(ca=self.tls_ca, cert=self.tls_client_cert, key=self.tls_client_key)

    @classmethod
    def load(cls, **overrides) -> "Settings":
        """Environment, then non-None overrides (CLI flags). Raises ConfigError on a bad value."""
        try:
            settings = cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "?"
            env = f"OPD_{name.upper()}"
            value = overrides[name] if overrides.get(name) is not None else os.environ.get(env)
            raise ConfigError(f"{env}={value!r}: {err['msg']}") from None
        return settings


def check_tls(s: Settings) -> None:
    """Fail at start-up, naming the variable, when a TLS file is missing, unreadable or mismatched.
    Called by the processes that use the files (teacher, scorer, trainer), not by `load`: values
    are checked anywhere, files only where they must exist."""
    pairs = (("OPD_TLS_CERT", s.tls_cert, "OPD_TLS_KEY", s.tls_key),
             ("OPD_TLS_CLIENT_CERT", s.tls_client_cert, "OPD_TLS_CLIENT_KEY", s.tls_client_key))
    for cert_var, cert, key_var, key in pairs:
        if (cert is None) != (key is None):
            missing = key_var if key is None else cert_var
            raise ConfigError(f"{missing} is unset: {cert_var} and {key_var} go together (a certificate and its key)")
    if s.tls_client_ca is not None and s.tls_cert is None:
        raise ConfigError(f"OPD_TLS_CLIENT_CA={str(s.tls_client_ca)!r}: mutual TLS needs the server's own "
                          "certificate too; set OPD_TLS_CERT and OPD_TLS_KEY")
    try:
        for cert_var, cert, key_var, key in pairs:
            if cert is not None:
                check_pair(cert, key, cert_var, key_var)
        for var, ca in (("OPD_TLS_CLIENT_CA", s.tls_client_ca), ("OPD_TLS_CA", s.tls_ca)):
            if ca is not None:
                check_pair(ca, None, var, "")
    except ValueError as e:
        raise ConfigError(str(e)) from None
