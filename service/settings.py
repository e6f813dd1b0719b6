"""The service's one configuration object (env prefix `IFA_`), validated at start.

Nothing here is read at import time: `Settings()` reads the environment when it is
called (by `service.app.app_from_env` or a test), and `create_app(settings)` receives it.
Every field is documented in `docs/service.md` (the configuration table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IFA_",
        env_file=None,
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    # --- Redis
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, unix://); unset = embedded server",
    )
    embedded_redis_dir: Path = Field(
        default=Path("var/redis"), description="data directory of the embedded Redis server"
    )
    redis_timeout_ms: float = Field(
        default=50.0, gt=0, le=60_000, description="connect/read timeout of every Redis call"
    )
    redis_cooldown_ms: float = Field(
        default=500.0,
        ge=0,
        le=60_000,
        description="after a failed Redis call, /rank skips Redis this long (degraded answers)",
    )
    redis_max_connections: int = Field(default=64, ge=1, le=10_000, description="Redis pool size")
    idempotency_ttl_s: int = Field(
        default=86_400, ge=1, description="retention of /events idempotency keys"
    )
    state_ttl_s: int = Field(
        default=30 * 86_400, ge=60, description="expiry of user states written back to Redis"
    )

    # --- model
    artifacts_dir: Path = Field(default=Path("artifacts"), description="where model versions live")
    model_version: str = Field(
        default="latest", min_length=1, description="version loaded at start"
    )
    prefer_cuda: bool = Field(default=True, description="use the CUDA provider when it loads")
    infer_threads: int = Field(
        default=1, ge=1, le=256, description="ORT intra-op threads per session"
    )
    infer_workers: int = Field(default=2, ge=1, le=256, description="inference executor threads")
    inline_score_ms: float = Field(
        default=2.0,
        ge=0,
        le=1_000,
        description="score on the event loop (no thread hops) when its estimate is under "
        "this; 0 = always on the inference pool",
    )
    warmup_candidates: Annotated[tuple[int, ...], NoDecode] = Field(
        default=(1, 100, 500, 1000, 2000),
        description="candidate counts run once at load (capped at IFA_MAX_CANDIDATES)",
    )

    # --- request limits and budget
    default_budget_ms: float = Field(
        default=40.0, gt=0, le=60_000, description="latency budget when a request gives none"
    )
    max_candidates: int = Field(default=2000, ge=1, le=100_000, description="candidates per /rank")
    max_events_per_call: int = Field(
        default=1000, ge=1, le=100_000, description="events per /events"
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, le=1 << 30, description="request body limit (413 above)"
    )
    max_inflight: int = Field(
        default=64, ge=1, le=100_000, description="in-flight /rank above which requests get 503"
    )
    state_cache_size: int = Field(
        default=100_000, ge=1, le=100_000_000, description="in-process LRU of user states"
    )
    refresh_inline_events: int = Field(
        default=256,
        ge=0,
        le=100_000,
        description="new events read in the warm path's single round trip (GETRANGE cap)",
    )

    # --- admin and logging
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token for /admin/reload; unset: the endpoint is 404"
    )
    log_level: LogLevel = Field(default="info", description="log level of the service and uvicorn")

    @field_validator("redis_url", "admin_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        # `IFA_REDIS_URL=` (empty) in a compose file means "not configured".
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("warmup_candidates", mode="before")
    @classmethod
    def _csv(cls, v: object) -> object:
        # env form: IFA_WARMUP_CANDIDATES=1,100,500
        if isinstance(v, str):
            return tuple(int(x) for x in v.replace(" ", "").split(",") if x)
        if isinstance(v, int):
            return (v,)
        return v

    @field_validator("warmup_candidates")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(x < 1 for x in v):
            raise ValueError("candidate counts must be >= 1")
        return v

    @field_validator("admin_token")
    @classmethod
    def _token_strength(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 8:
            raise ValueError("admin token must be at least 8 characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_inflight < self.infer_workers:
            raise ValueError("IFA_MAX_INFLIGHT must be >= IFA_INFER_WORKERS")
        return self

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    def warmup_counts(self) -> tuple[int, ...]:
        counts = {min(c, self.max_candidates) for c in self.warmup_candidates}
        return tuple(sorted(counts)) or (1,)
