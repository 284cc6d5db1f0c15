"""Request and response models: the text-generation-inference (TGI) protocol and the OpenAI protocol.

Validation lives here: every static rule (types, ranges, TGI's cross-field rules) is a pydantic
constraint, so the OpenAPI schema documents it and an invalid request never reaches the engine. Rules
that depend on settings (token caps, keyword and candidate limits) are checked against the loaded
model's tokenizer by ``app.tokenization`` and ``app.jobs``, and a request's cost by ``app.admission``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from refiners.config import (
    MAX_CANDIDATES,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
    MAX_LENGTH_PENALTY,
    MAX_STEPS,
    MAX_WEIGHT,
)

MAX_SEED = 2**63 - 1
KeywordStr = Annotated[str, Field(min_length=1, max_length=MAX_KEYWORD_CHARS)]


class _Strict(BaseModel):
    """Base of every request model. Subclasses' ``model_config`` is merged into this one."""

    # NaN/inf would poison the objective; JSON parsers accept them, so refuse them here.
    # strict: a JSON string or bool where a number is expected ("8", true) is a client bug, not an
    # 8 or a 1; an int where a float is expected still counts, as JSON has one number type.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Refinement


class RefineParameters(_Strict):
    """What to refine and how; fields left out take the server defaults (see ``GET /info``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(None, description="false: plain generation; default: server setting")
    method: Literal["coordinate", "gradient", "hybrid"] | None = Field(None, description="refinement method")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="refinement steps")
    candidates: int | None = Field(None, ge=1, le=MAX_CANDIDATES, description="edits scored per step")
    keywords: list[KeywordStr] = Field(
        default_factory=list, max_length=MAX_KEYWORDS, description="words the output should contain"
    )
    length_penalty: float = Field(
        1.0, ge=0, le=MAX_LENGTH_PENALTY, description="GNMT alpha of the length normalisation"
    )
    target_length: int | None = Field(None, ge=1, le=100_000, description="wanted output length in tokens")
    weights: dict[
        Annotated[str, Field(min_length=1, max_length=64)], Annotated[float, Field(ge=0, le=MAX_WEIGHT)]
    ] = Field(
        default_factory=dict, description=f"weight of each objective term by name (0 to {MAX_WEIGHT:g})"
    )
    step_size: float = Field(1.0, gt=0, le=100, description="continuous step of gradient/hybrid methods")


class Refinement(BaseModel):
    """How the refinement step changed the initial output."""

    method: str
    initial_text: str
    refined_text: str
    objective_before: dict[str, float] = Field(description='"total" and each term\'s unweighted value')
    objective_after: dict[str, float]
    edits: list[dict[str, Any]]
    candidates_scored: int
    generate_seconds: float
    refine_seconds: float
    gradient_seconds: float
    scoring_seconds: float
    steps: int
    improved: bool


# --------------------------------------------------------------------------------------------------
# TGI protocol


def _reject_unsupported(values: dict[str, Any], fields: dict[str, Any]) -> None:
    """Raise for TGI parameters we accept in the schema (clients send them) but cannot honour."""
    for name, neutral in fields.items():
        value = values.get(name)
        if value is not None and value != neutral:
            raise ValueError(f"parameter {name!r} is not supported by this server: leave it out")


class GenerateParameters(_Strict):
    """TGI generation parameters, plus ``refine``."""

    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(None, ge=1, description="sample N outputs, return the best by the objective")
    decoder_input_details: bool = Field(False, description="return the prompt tokens (prefill)")
    details: bool = Field(False, description="return the generated tokens with their log-probabilities")
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate (capped by the server)")
    # Bounded away from 0: dividing logits by ~1e-38 overflows float32 and sampling then fails.
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    return_full_text: bool | None = Field(False, description="prepend the input to generated_text")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list)
    temperature: float | None = Field(
        None, ge=1e-4, le=100, description="> 0; for greedy use do_sample false"
    )
    top_k: int | None = Field(None, gt=0, le=1_000_000)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, ge=1, description="keep only the last N input tokens")
    # Sent by TGI clients; accepted only with their neutral value.
    frequency_penalty: float | None = None
    typical_p: float | None = None
    top_n_tokens: int | None = None
    watermark: bool | None = False
    grammar: Any | None = None
    adapter_id: str | None = None
    refine: RefineParameters | None = Field(None, description="refinement; omitted: server defaults")

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, values: Any) -> Any:
        if isinstance(values, dict):
            _reject_unsupported(
                values,
                {
                    "frequency_penalty": 0.0,
                    "typical_p": 1.0,
                    "top_n_tokens": 0,
                    "watermark": False,
                    "grammar": None,
                    "adapter_id": None,
                },
            )
        return values

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when any sampling warper is set to a non-neutral value."""
        return bool(
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
        )

    @model_validator(mode="after")
    def _best_of_rules(self) -> GenerateParameters:
        if self.best_of is not None and self.best_of > 1:
            if not self.sampling:
                raise ValueError("best_of > 1 needs sampling: set do_sample to true (or a temperature)")
            if self.seed is not None:
                raise ValueError("seed must not be set when best_of > 1: each sequence gets its own seed")
        return self


class GenerateRequest(_Strict):
    """``POST /generate`` and ``POST /generate_stream`` body."""

    inputs: str = Field(min_length=1, description="the prompt")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="only for POST /: stream server-sent events")

    @model_validator(mode="after")
    def _best_of_stream(self) -> GenerateRequest:
        if self.stream and self.parameters.best_of is not None and self.parameters.best_of > 1:
            raise ValueError("best_of > 1 is not supported when streaming")
        return self


class RefineOnlyParameters(_Strict):
    model_config = ConfigDict(extra="ignore")

    refine: RefineParameters | None = Field(None, description="how to refine; `enabled` must be left out")
    truncate: int | None = Field(None, ge=1, description="keep only the last N input tokens")

    @field_validator("refine")
    @classmethod
    def _always_refines(cls, refine: RefineParameters | None) -> RefineParameters | None:
        # Silently refining anyway would hide the client's mistake; refusing says where to go instead.
        if refine is not None and refine.enabled is False:
            raise ValueError(
                "enabled false is not allowed: /refine always refines, so leave enabled out "
                "(use /generate with enabled false for plain generation)"
            )
        return refine


class RefineOnlyRequest(_Strict):
    """``POST /refine`` body: refine a given output of the prompt without generating."""

    inputs: str = Field(min_length=1, description="the prompt the output answers")
    output: str = Field(min_length=1, description="the output to refine (from any model)")
    parameters: RefineOnlyParameters = Field(default_factory=RefineOnlyParameters)


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(PrefillToken):
    special: bool


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class Details(BaseModel):
    """TGI details. ``prefill`` and ``tokens`` are present only when asked for."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] | None = None
    tokens: list[Token] | None = None
    best_of_sequences: list[BestOfSequence] | None = None
    refinement: Refinement | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    refinement: Refinement | None = None


class StreamResponse(BaseModel):
    """One server-sent event of ``/generate_stream``: a token; the last one also the final text."""

    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class RefineOnlyResponse(BaseModel):
    generated_text: str = Field(description="the refined output")
    refinement: Refinement


class ErrorResponse(BaseModel):
    """The TGI error body."""

    error: str
    error_type: str


# --------------------------------------------------------------------------------------------------
# OpenAI protocol


class _OpenAIBase(_Strict):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="ignored: this server serves one model")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8, description="choices to return")
    stream: bool = False
    stop: str | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM-style extra body fields).
    top_k: int | None = Field(None, gt=0, le=1_000_000)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    refine: RefineParameters | None = Field(None, description="refinement; omitted: server defaults")

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, values: Any) -> Any:
        if isinstance(values, dict):
            _reject_unsupported(
                values, {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": ""}
            )
        return values

    @model_validator(mode="after")
    def _stream_single_choice(self) -> _OpenAIBase:
        if self.stream and self.n > 1:
            raise ValueError("n > 1 is not supported when streaming: send one request per choice")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_OpenAIBase):
    """``POST /v1/completions`` body."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=8)]
    ) = Field(description="a prompt or a list of prompts")
    max_tokens: int | None = Field(None, ge=1, description="default 16 (OpenAI)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="return each chosen token's log-probability")
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIBase):
    """``POST /v1/chat/completions`` body (the model's chat template builds the prompt)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="only 0 is supported")
    stream_options: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _no_tools(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this server: leave them out")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None
    refinement: Refinement | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: dict[str, Any] | None = None
    refinement: Refinement | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "refiner"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------------------------------
# Service


class RefineDefaults(BaseModel):
    enabled: bool
    method: str
    steps: int
    candidates: int
    max_candidates: int
    max_keywords: int


class Info(BaseModel):
    """``GET /info``: what this server runs and its limits."""

    model_id: str
    model_dtype: str
    model_device_type: str
    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int
    max_best_of: int
    max_stop_sequences: int
    max_batch_size: int
    max_queue: int
    version: str
    refine_defaults: RefineDefaults


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "stalled", "busy"]
    error: str | None = None
