"""Request and response models: the text-generation-inference (TGI) protocol and the OpenAI protocol.

Validation lives here: every static rule (types, ranges, cross-field rules such as "best_of needs
sampling") is a pydantic constraint, so the OpenAPI schema documents it and an invalid request never
reaches the engine. A request converts itself into engine parameters (``to_sampling_params``,
``to_refine_config``, ``to_best_of``); the rules that depend on the settings or on the model are
checked on the way by ``app.limits.RequestLimits``, the token limits of prompts by
``app.tokenization`` and a request's cost by ``app.admission``. Routes build their answers as the
response models below, so what is sent is what the OpenAPI schema declares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.errors import ValidationFailed
from app.settings import RefineMethod
from refiners.config import (
    MAX_CANDIDATES,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
    MAX_LENGTH_PENALTY,
    MAX_REFERENCE_CHARS,
    MAX_STEPS,
    MAX_WEIGHT,
    RefineConfig,
)
from refiners.errors import InvalidRequestError
from refiners.generation import MAX_SEED, SamplingParams

if TYPE_CHECKING:
    from app.engine import JobResult
    from app.limits import RequestLimits

KeywordStr = Annotated[str, Field(min_length=1, max_length=MAX_KEYWORD_CHARS)]
StopStr = Annotated[str, Field(min_length=1, max_length=256)]
# Sampling at a temperature this low is greedy decoding in all but name (and overflows float32 logits).
GREEDY_BELOW = 1e-4
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _absent_if_none() -> Any:
    """A field that defaults to None and is left out of the JSON answer while it is None."""
    return Field(None, exclude_if=lambda value: value is None)


class _Strict(BaseModel):
    """Base of every request model. Subclasses' ``model_config`` is merged into this one."""

    # NaN/inf would poison the objective; JSON parsers accept them, so refuse them here.
    # strict: a JSON string or bool where a number is expected ("8", true) is a client bug, not an
    # 8 or a 1; an int where a float is expected still counts, as JSON has one number type.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


def _reject_unsupported(values: Any, fields: dict[str, Any]) -> Any:
    """Raise for parameters we accept in the schema (clients send them) but cannot honour."""
    if isinstance(values, dict):
        for name, neutral in fields.items():
            value = values.get(name)
            if value is not None and value != neutral:
                raise ValueError(f"parameter {name!r} is not supported by this server: leave it out")
    return values


def _best_of_needs_sampling(best_of: int | None, sampling: bool, how: str) -> None:
    """The one rule for both protocols: several sequences to choose from exist only when sampling."""
    if best_of is not None and best_of > 1 and not sampling:
        raise ValueError(f"best_of > 1 needs sampling (greedy sequences are all the same): {how}")


def _sampling_params(where: str, **kwargs: Any) -> SamplingParams:
    """``SamplingParams(**kwargs)``; its refusals (the library's own checks) become 422 answers whose
    message starts with ``where``, the request's path to the parameters."""
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        raise ValidationFailed(f"{where}{exc}") from exc


# --------------------------------------------------------------------------------------------------
# Refinement


class RefineParameters(_Strict):
    """What to refine and how; fields left out take the server defaults (see ``GET /info``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(None, description="false: plain generation; default: server setting")
    method: RefineMethod | None = Field(None, description="refinement method")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="refinement steps")
    candidates: int | None = Field(None, ge=1, le=MAX_CANDIDATES, description="edits scored per step")
    keywords: list[KeywordStr] = Field(
        default_factory=list, max_length=MAX_KEYWORDS, description="words the output should contain"
    )
    avoid: list[KeywordStr] = Field(
        default_factory=list,
        max_length=MAX_KEYWORDS,
        description="words or phrases the output must not contain (matched like keywords)",
    )
    reference: str | None = Field(
        None, max_length=MAX_REFERENCE_CHARS, description="a text the output should come closer to"
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

    @staticmethod
    def config_of(params: RefineParameters | None, limits: RequestLimits, field: str) -> RefineConfig | None:
        """The refinement a request's ``refine`` asks for; None for plain generation (``enabled``
        false, or left out while the server default is off)."""
        params = params or RefineParameters()
        enabled = limits.settings.refine_default_enabled if params.enabled is None else params.enabled
        return params.to_refine_config(limits, field) if enabled else None

    def to_refine_config(self, limits: RequestLimits, field: str) -> RefineConfig:
        """This refinement with the server defaults filled in, checked against the server's limits."""
        s = limits.settings
        keywords = limits.keywords(self.keywords, f"{field}.keywords")
        avoid = limits.keywords(self.avoid, f"{field}.avoid")
        reference = limits.reference(self.reference, f"{field}.reference")
        candidates = limits.candidates(self.candidates, f"{field}.candidates")
        weights = limits.weights(self.weights, f"{field}.weights")
        try:
            return RefineConfig(
                method=self.method or s.refine_default_method,
                steps=self.steps or s.refine_default_steps,
                candidates=candidates,
                keywords=keywords,
                length_penalty=self.length_penalty,
                target_length=self.target_length,
                weights=weights,
                step_size=self.step_size,
                reference=reference,
                avoid=avoid,
            )
        except InvalidRequestError as exc:
            raise ValidationFailed(f"{field}: {exc}") from exc


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
    refine_seconds: float = Field(
        description="wall time of the refinement call (of the whole batch); the parts below are this "
        "request's share of it: prompt, gradient, propose, lookahead and scoring"
    )
    prompt_seconds: float
    gradient_seconds: float
    propose_seconds: float
    lookahead_seconds: float
    scoring_seconds: float
    steps: int
    improved: bool

    @classmethod
    def of(cls, result: JobResult) -> Refinement | None:
        """The report of a job's refinement (with the job's wall times); None for plain generation."""
        r = result.refinement
        if r is None:
            return None
        timing = {"generate_seconds": result.generate_seconds, "refine_seconds": result.refine_seconds}
        reported = {name: getattr(r, name) for name in cls.model_fields.keys() - timing.keys()}
        return cls.model_validate({**reported, **timing})


# --------------------------------------------------------------------------------------------------
# TGI protocol

# Parameters TGI clients send, accepted only with these neutral values.
_TGI_NEUTRAL = {
    "frequency_penalty": 0.0,
    "typical_p": 1.0,
    "top_n_tokens": 0,
    "watermark": False,
    "grammar": None,
    "adapter_id": None,
}


class GenerateParameters(_Strict):
    """TGI generation parameters, plus ``refine``."""

    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(None, ge=1, description="sample N outputs, return the best by the objective")
    decoder_input_details: bool = Field(False, description="return the prompt tokens (prefill)")
    details: bool = Field(False, description="return the generated tokens with their log-probabilities")
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1, description="tokens to generate (capped by the server)")
    min_new_tokens: int | None = Field(
        None, ge=0, description="extension (as transformers'): no EOS before this many tokens"
    )
    # Bounded away from 0: dividing logits by ~1e-38 overflows float32 and sampling then fails.
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    return_full_text: bool | None = Field(False, description="prepend the input to generated_text")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[StopStr] = Field(default_factory=list)
    temperature: float | None = Field(
        None, ge=GREEDY_BELOW, le=100, description="> 0; for greedy use do_sample false"
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
        return _reject_unsupported(values, _TGI_NEUTRAL)

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
        _best_of_needs_sampling(self.best_of, self.sampling, "set do_sample to true (or a temperature)")
        if self.best_of is not None and self.best_of > 1 and self.seed is not None:
            raise ValueError("seed must not be set when best_of > 1: each sequence gets its own seed")
        return self

    def to_sampling_params(self, max_new_tokens: int, limits: RequestLimits) -> SamplingParams:
        """How to generate: sampling is on when asked for or when a warper is set."""
        return _sampling_params(
            "parameters: ",
            max_new_tokens=max_new_tokens,
            do_sample=self.sampling,
            temperature=self.temperature if self.temperature is not None else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=limits.stop(self.stop, "parameters.stop"),
            min_new_tokens=self.min_new_tokens or 0,
        )

    def to_refine_config(self, limits: RequestLimits) -> RefineConfig | None:
        return RefineParameters.config_of(self.refine, limits, "parameters.refine")

    def to_best_of(self, limits: RequestLimits) -> int:
        return limits.best_of(self.best_of, "parameters.best_of")


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

    def to_refine_config(self, limits: RequestLimits) -> RefineConfig:
        # Refining is the point of this route: a server default of off does not apply (and the schema
        # refuses "enabled": false).
        return (self.parameters.refine or RefineParameters()).to_refine_config(limits, "parameters.refine")

    @staticmethod
    def to_sampling_params(output_tokens: int) -> SamplingParams:
        """Parameters of a job that generates nothing itself: the engine skips generation when the
        job carries ``output_ids``."""
        return SamplingParams(max_new_tokens=max(1, output_tokens))


class Token(BaseModel):
    """A token and the text it adds; ``logprob`` is None for prompt tokens (not computed)."""

    id: int
    text: str
    logprob: float | None = None
    special: bool


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class GeneratedSummary(BaseModel):
    """What every TGI answer says about a generated sequence."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None


class BestOfSequence(GeneratedSummary):
    generated_text: str
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class StreamDetails(GeneratedSummary):
    refinement: Refinement | None = None


class Details(StreamDetails):
    """TGI details. ``prefill``, ``tokens`` and ``best_of_sequences`` are present only when asked for."""

    prefill: list[Token] | None = _absent_if_none()
    tokens: list[Token] | None = _absent_if_none()
    best_of_sequences: list[BestOfSequence] | None = _absent_if_none()


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


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
    """The error body of every answer, and the last event of a stream that failed after it started."""

    error: str
    error_type: str


# --------------------------------------------------------------------------------------------------
# OpenAI protocol


class _OpenAIRequest(_Strict):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="ignored: this server serves one model")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8, description="choices to return")
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true}: a usage chunk')
    stop: str | list[StopStr] | None = None
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
        neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": ""}
        return _reject_unsupported(values, neutral)

    @model_validator(mode="after")
    def _stream_single_choice(self) -> _OpenAIRequest:
        if self.stream and self.n > 1:
            raise ValueError("n > 1 is not supported when streaming: send one request per choice")
        return self

    @property
    def sampling(self) -> bool:
        """OpenAI samples at temperature 1 by default; 0 (or below ``GREEDY_BELOW``, where dividing
        the logits would overflow) means greedy."""
        return (1.0 if self.temperature is None else self.temperature) >= GREEDY_BELOW

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def requested_tokens(self) -> tuple[int | None, str]:
        """The tokens to generate (None: the server default) and the field that asked for them."""
        raise NotImplementedError

    def to_sampling_params(
        self, max_new_tokens: int, limits: RequestLimits, choice: int = 0
    ) -> SamplingParams:
        """How to generate choice ``choice``; with a seed, choice i uses seed + i so that they differ."""
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        return _sampling_params(
            "",
            max_new_tokens=max_new_tokens,
            do_sample=self.sampling,
            temperature=self.temperature if self.sampling and self.temperature is not None else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=None if self.seed is None else self.seed + choice,
            stop=limits.stop(stop, "stop"),
        )

    def to_refine_config(self, limits: RequestLimits) -> RefineConfig | None:
        return RefineParameters.config_of(self.refine, limits, "refine")

    def to_best_of(self, limits: RequestLimits) -> int:
        return 1


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions`` body."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=8)]
    ) = Field(description="a prompt or a list of prompts")
    max_tokens: int | None = Field(None, ge=1, description="default 16 (OpenAI)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="return each chosen token's log-probability")
    best_of: int | None = Field(None, ge=1, description="> 1 needs sampling (a temperature above 0)")
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt_when_streaming(cls, prompt: str | list[str], info: ValidationInfo) -> str | list[str]:
        if info.data.get("stream") and isinstance(prompt, list) and len(prompt) > 1:
            raise ValueError("streaming takes one prompt: send one request per prompt")
        return prompt

    @model_validator(mode="after")
    def _best_of_rules(self) -> CompletionRequest:
        _best_of_needs_sampling(self.best_of, self.sampling, "set temperature above 0 (or leave it out)")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def requested_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens or OPENAI_DEFAULT_MAX_TOKENS, "max_tokens"

    def to_best_of(self, limits: RequestLimits) -> int:
        return limits.best_of(self.best_of, "best_of")


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


class ChatCompletionRequest(_OpenAIRequest):
    """``POST /v1/chat/completions`` body (the model's chat template builds the prompt)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="only 0 is supported")
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _no_tools(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this server: leave them out")
        return self

    @property
    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is the newer name of ``system``)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages
        ]

    @property
    def requested_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        total = prompt_tokens + completion_tokens
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"] | None
    refinement: Refinement | None = None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None = None


class ChatDelta(BaseModel):
    """What a chunk adds to the message: the role in the first chunk, then the content."""

    role: Literal["assistant"] | None = _absent_if_none()
    content: str | None = _absent_if_none()


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None


class _OpenAIObject(BaseModel):
    id: str
    created: int
    model: str


class CompletionResponse(_OpenAIObject):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_OpenAIObject):
    """One server-sent event of a streamed completion; the usage chunk has no choices."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = _absent_if_none()


class ChatCompletionResponse(_OpenAIObject):
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_OpenAIObject):
    """One server-sent event of a streamed chat completion; the usage chunk has no choices."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _absent_if_none()


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
    terms: dict[str, float] = Field(
        description="the objective terms this server offers, with their default weights (refine.weights)"
    )
    reward_model: str | None = Field(description="the reward model of the `reward` term; null: none loaded")


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
    generator: str | None = Field(
        description="the engine that generates initial outputs (REFINER_GENERATOR); null: this server's model"
    )


class UpstreamHealth(BaseModel):
    """Whether the upstream generator (``REFINER_GENERATOR``) answers its health route."""

    generator: str
    answers: bool
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "stalled", "busy", "upstream_unavailable"]
    error: str | None = None
    upstream: UpstreamHealth | None = _absent_if_none()
