"""The one settings model of gatewatch: the flat keys of design.md, from a YAML file overridden by env vars.

Precedence, highest first: explicit keyword arguments (the CLI's flags), `GATEWATCH_<KEY>` environment
variables, the YAML file named by `--config` / `GATEWATCH_CONFIG`, the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class ModelOverrides(BaseModel):
    """Per-model tunables that override the global batching defaults."""

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_ms: float | None = Field(default=None, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWATCH_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    registry: str = "models"
    """A directory path, `file://…`, or `mlflow+http(s)://host:port`."""
    registry_poll_seconds: float = Field(default=10.0, gt=0)
    """How often the registry is polled for new versions and alias moves."""
    redis_url: str | None = None
    """`redis://` or `rediss://user:pass@host:port/db`; absent means the embedded Redis in `data_dir`."""
    data_dir: Path = Path(".gatewatch")
    """Embedded Redis file, log spool, model cache."""
    admin_token: SecretStr | None = None
    """Bearer token for `/admin/*`; absent means the admin API refuses every call."""
    endpoints: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Initial routes (endpoint -> route); routes stored in Redis win once they exist."""
    workers: int = Field(default=1, ge=1)
    """Gateway worker processes."""

    max_batch_size: int = Field(default=32, ge=1)
    """Rows per batch; overridable per model under `models`."""
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    """Longest a request waits for a batch to fill; a lone request never waits for company."""
    max_queue_size: int = Field(default=512, ge=1)
    """Requests waiting per model version before new ones get 429."""
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Larger request bodies get 413."""
    body_timeout_seconds: float = Field(default=15.0, gt=0)
    """A request body that stops arriving for this long gets 408 and its connection is closed (< shutdown timeout)."""
    models: dict[str, ModelOverrides] = Field(default_factory=dict)
    """Per-model overrides of the batching settings."""

    inference_threads: int = Field(default=2, ge=1)
    """Threads that run onnxruntime sessions (off the event loop), shared by all models of a process."""
    ort_intra_op_threads: int = Field(default=1, ge=0)
    """onnxruntime intra-op threads per session (0 = onnxruntime's default: one per core)."""
    ort_inter_op_threads: int = Field(default=1, ge=0)
    """onnxruntime inter-op threads per session (0 = onnxruntime's default)."""
    shutdown_timeout_seconds: float = Field(default=30.0, gt=0)
    """On SIGTERM, how long in-flight requests get to finish."""

    shadow_max_in_flight: int = Field(default=32, ge=1)
    """Shadow inferences running at once per process; beyond it shadows are skipped (and counted)."""
    route_resync_seconds: float = Field(default=5.0, gt=0)
    """Besides pub/sub notifications, re-read all routes from Redis this often."""

    log_enabled: bool = True
    """Log every request and answer to Redis streams (`gatewatch:log:{name}`)."""
    log_maxlen: int = Field(default=1_000_000, ge=1)
    """Approximate cap (XADD MAXLEN ~) per log stream."""
    log_sample_rate: float = Field(default=1.0, ge=0, le=1)
    """Share of requests whose tensors are logged; metadata is always logged. A route's `log.sample` wins."""
    log_redact: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Input names whose values are never written (comma-separated in the environment)."""
    log_max_tensor_bytes: int = Field(default=1 << 20, ge=0)
    """Tensors larger than this are cut in the log, flagged `payload=truncated`."""
    log_queue_size: int = Field(default=100_000, ge=1)
    """Records waiting for the log writer; beyond it records are dropped (and counted)."""
    log_batch_size: int = Field(default=512, ge=1)
    """Records per pipelined XADD round trip."""
    log_linger_ms: float = Field(default=5.0, ge=0)
    """How long a partial batch of log records waits for more before it is written (fewer Redis round trips)."""
    log_spool_max_bytes: int = Field(default=1 << 30, ge=0)
    """Cap of the disk spool that holds records while Redis is unreachable."""
    redis_timeout_seconds: float = Field(default=2.0, gt=0)
    """A Redis call slower than this counts as failed (records are spooled)."""
    window_rows: int = Field(default=1000, ge=1)
    """Rows per monitor window (a 64-row request adds 64)."""
    window_seconds: float = Field(default=60.0, gt=0)
    """A window also closes after this long if it holds at least `min_window_rows`."""
    min_window_rows: int = Field(default=100, ge=1)
    """Fewest rows a time-closed window needs to be analysed."""
    reference_rows: int = Field(default=2000, ge=1)
    """Live rows taken as the drift reference when the registry has no `reference.npz`."""
    drift_alpha: float = Field(default=0.01, gt=0, lt=1)
    """Family-wise significance per window, across features."""
    drift_persistence: int = Field(default=2, ge=1)
    """Consecutive drifted windows before `drift.detected` (and breached windows before `latency.slo_breach`)."""
    drift_resolve_after: int = Field(default=3, ge=1)
    """Consecutive clean windows before `drift.resolved` / `latency.slo_resolved`."""
    retrain_after_windows: int = Field(default=2, ge=1)
    """Drifted windows before `retrain.requested`."""
    retrain_cooldown_seconds: float = Field(default=3600.0, ge=0)
    """Per model version: one `retrain.requested` per incident within this time."""
    latency_slo_ms: float | None = Field(default=None, gt=0)
    """p99 latency threshold per window; absent means no latency alerts."""
    webhook_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated in the environment; every alert event goes to each."""
    retrain_webhook_url: str | None = None
    """Receives `retrain.requested` only."""
    webhook_secret: SecretStr | None = None
    """HMAC-SHA256 key for the `X-Gatewatch-Signature` of every webhook."""

    drift_correction: Literal["holm", "bonferroni"] = "holm"
    """How `drift_alpha` is shared across a window's features (family-wise): Holm's step-down, or Bonferroni."""
    monitor_lease_seconds: float = Field(default=10.0, gt=0)
    """A monitor worker's claim on a log stream lasts this long unless renewed; a crashed worker's streams move on
    after it. Renewed every third of it."""
    monitor_discovery_seconds: float = Field(default=5.0, gt=0)
    """How often a monitor worker looks for new `gatewatch:log:*` streams and rebalances its share of them."""
    monitor_read_count: int = Field(default=1000, ge=1)
    """Entries per XREADGROUP call."""
    monitor_threads: int = Field(default=2, ge=1)
    """Threads for a monitor worker's heavy work (tensor decoding, drift statistics), off the event loop."""
    monitor_results_maxlen: int = Field(default=100_000, ge=1)
    """Approximate cap (XADD MAXLEN ~) of the stored window results, `gatewatch:windows`."""
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    """One webhook POST slower than this counts as failed (and is retried)."""
    webhook_attempts: int = Field(default=6, ge=1)
    """Tries per receiver before an event goes to `gatewatch:deadletter`."""
    webhook_backoff_seconds: float = Field(default=0.5, ge=0)
    """Delay before the first retry; doubled each time, with full jitter, up to `webhook_backoff_max_seconds`."""
    webhook_backoff_max_seconds: float = Field(default=30.0, ge=0)
    """Longest delay between two tries of one webhook delivery."""

    @field_validator("webhook_urls", "log_redact", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _stalled_bodies_end_before_shutdown_does(self) -> Settings:
        # At SIGTERM a stalled upload is answered 408 (and logged) only if its timeout comes before the shutdown's;
        # otherwise uvicorn cancels it at the shutdown timeout and it leaves no record.
        if self.body_timeout_seconds >= self.shutdown_timeout_seconds:
            raise ValueError(
                f"body_timeout_seconds ({self.body_timeout_seconds:g}) must be shorter than "
                f"shutdown_timeout_seconds ({self.shutdown_timeout_seconds:g})"
            )
        return self

    def batch_limits(self, model: str) -> tuple[int, float]:
        """Max batch rows and queue delay (ms) for `model`, overrides applied."""
        override = self.models.get(model, ModelOverrides())
        rows = override.max_batch_size or self.max_batch_size
        delay = override.max_queue_delay_ms
        return rows, self.max_queue_delay_ms if delay is None else delay

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file, the environment and explicit overrides.

    Raises pydantic's ValidationError (with every problem listed) on a bad value, and FileNotFoundError
    when the named file does not exist.
    """
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    return _FromFile(**overrides)


def reference_table() -> str:
    """The configuration reference (Markdown) from the fields themselves, so the README cannot drift from them."""
    lines = ["| key | env | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "—" if default in (None, [], {}) else f"`{default}`"
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | `GATEWATCH_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
