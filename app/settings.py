"""Service settings: one pydantic-settings class, read from ``REFINER_*`` environment variables.

The CLI (``refiner serve``) overrides individual fields; everything else (routes, engine, limits)
reads this object and nothing else, so there is one source of truth for configuration.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.admission import DEFAULT_MEMORY_SHARE, DEFAULT_REQUEST_SHARE, MB, machine_memory_bytes
from refiners.config import RefineConfig
from refiners.methods import METHODS
from refiners.models import EMBEDDED_MODEL

# The accepted values of ``refine.method`` (settings and requests): the method registry's names, so a
# method added to the library is accepted here without an edit.
RefineMethod = Literal[tuple(METHODS)]  # type: ignore[valid-type]
# The protocols an upstream generator may speak (``REFINER_GENERATOR=<protocol>:<url>``, app.upstream).
UPSTREAM_PROTOCOLS = ("openai", "tgi")


class Settings(BaseSettings):
    """Everything the service can be configured with. Defaults work offline on a laptop CPU.

    Each field ``name`` is read from the environment variable ``REFINER_<NAME>`` (case-insensitive).
    """

    model_config = SettingsConfigDict(env_prefix="REFINER_", extra="ignore")

    # Model
    model: str = Field(EMBEDDED_MODEL, description="embedded model name, a local directory or a hub id")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    cache_dir: str | None = Field(None, description="where the converted embedded model is kept")
    pack_weights: bool = Field(
        True,
        description="float32 on a CPU: pack the linear weights once for oneDNN (faster passes, twice "
        "the weights' memory more)",
    )
    tcmalloc: bool = Field(
        True,
        description="`refiner serve` preloads tcmalloc where the system has it (libtcmalloc-minimal4): "
        "the CPU step 3-17% faster than with the C library's allocator (README, Speed)",
    )
    reward_model: str | None = Field(
        None, description="a sequence classifier with one output (local directory): the `reward` term"
    )

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_key: str | None = Field(None, description="when set, every route but /health needs a bearer token")
    log_level: str = "info"

    # Request limits (tokens of the model's tokenizer)
    max_input_tokens: int = Field(1024, ge=1)
    max_new_tokens: int = Field(512, ge=1, description="cap on parameters.max_new_tokens")
    max_total_tokens: int = Field(2048, ge=2, description="cap on input tokens + max_new_tokens")
    default_max_new_tokens: int = Field(100, ge=1, description="used when a request does not say (TGI: 100)")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_keywords: int = Field(32, ge=0)
    max_candidates: int = Field(256, ge=1)
    max_best_of: int = Field(8, ge=1)
    max_stop_sequences: int = Field(8, ge=0)

    # Engine
    max_batch_size: int = Field(8, ge=1)
    batch_window_ms: float = Field(
        20.0, ge=0, description="wait for another request to batch; each arrival restarts it, up to 5 windows"
    )
    max_queue: int = Field(64, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    scoring_chunk_size: int | None = Field(
        None, ge=1, description="most outputs in one refinement pass; default 64 on a CPU, 1024 on a GPU"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429/503 answers")

    # Cost bounds (app.admission): every request is estimated before it is queued
    memory_limit_mb: int | None = Field(
        None, ge=256, description="process memory ceiling; default 80% of the machine's or container's"
    )
    max_request_memory_mb: int | None = Field(
        None, ge=64, description="memory one request may need; default a quarter of the ceiling"
    )
    max_request_work_s: float | None = Field(
        None, gt=0, description="estimated work one request may take; default request_timeout_s"
    )
    scoring_pass_mb: int | None = Field(
        None, ge=16, description="memory budget of one refinement pass; default 256 on a CPU, 1/16 of a GPU's"
    )
    small_request_s: float = Field(
        4.0,
        ge=0,
        description="requests estimated at most this are small: they run between a large one's passes",
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="/health fails when work waits and the engine made no progress this long"
    )

    # Generation by another engine (app.upstream): unset = the local model generates
    generator: str | None = Field(
        None,
        description="openai:http://host:port/v1 (vLLM, SGLang, llama.cpp, ...) or tgi:http://host:port: the "
        "initial output comes from that server; the local model only refines it",
    )
    generator_model: str | None = Field(
        None,
        description="the `model` sent to an OpenAI upstream; unset: left out (the upstream's only model)",
    )
    generator_timeout_s: float = Field(
        60.0, gt=0, description="longest wait for the upstream: to connect, and for its answer or next event"
    )
    generator_max_concurrency: int = Field(
        32, ge=1, description="requests in flight to the upstream at once; more wait their turn"
    )

    # Refinement defaults (when a request omits `refine` or some of its fields)
    refine_default_enabled: bool = True
    # (the library's defaults, so a request behaves the same through the server and the library)
    refine_default_method: RefineMethod = RefineConfig.method
    refine_default_steps: int = Field(RefineConfig.steps, ge=1)
    refine_default_candidates: int = Field(RefineConfig.candidates, ge=1)

    @property
    def memory_limit_bytes(self) -> int:
        if self.memory_limit_mb is not None:
            return self.memory_limit_mb * MB
        return int(DEFAULT_MEMORY_SHARE * machine_memory_bytes())

    @property
    def request_memory_bytes(self) -> int:
        if self.max_request_memory_mb is not None:
            return self.max_request_memory_mb * MB
        return int(DEFAULT_REQUEST_SHARE * self.memory_limit_bytes)

    @property
    def request_work_s(self) -> float:
        return self.max_request_work_s if self.max_request_work_s is not None else self.request_timeout_s

    @field_validator("generator")
    @classmethod
    def _generator_spec(cls, spec: str | None) -> str | None:
        if not spec:
            return None
        protocol, _, url = spec.partition(":")
        if protocol not in UPSTREAM_PROTOCOLS or not url.startswith(("http://", "https://")):
            raise ValueError(
                f"generator {spec!r} must be PROTOCOL:URL with PROTOCOL one of "
                f"{', '.join(UPSTREAM_PROTOCOLS)} and an http(s) URL, e.g. openai:http://vllm:8000/v1"
            )
        return spec

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(
                f"max_input_tokens ({self.max_input_tokens}) must be below max_total_tokens "
                f"({self.max_total_tokens}) so that at least one token can be generated"
            )
        if self.default_max_new_tokens > self.max_new_tokens:
            self.default_max_new_tokens = self.max_new_tokens
        if self.refine_default_candidates > self.max_candidates:
            raise ValueError(
                f"refine_default_candidates ({self.refine_default_candidates}) exceeds max_candidates "
                f"({self.max_candidates})"
            )
        return self
