"""Translate validated requests into engine jobs.

Routes call these after pydantic validated the body and ``PromptTokenizer`` produced the ids; the
limits that depend on settings (keywords, candidates, best_of, stop sequences, term names) are
checked here, so the engine only receives jobs it can run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from app.errors import ValidationFailed
from app.schemas import GenerateParameters, RefineParameters
from app.settings import Settings
from refiners.config import MAX_KEYWORD_TOKENS, RefineConfig
from refiners.errors import InvalidRequestError
from refiners.generation import SamplingParams

# Sampling at a temperature this low is greedy decoding in all but name (and overflows float32 logits).
GREEDY_BELOW = 1e-4


class JobBuilder:
    """Build ``RefineConfig`` and ``SamplingParams`` from request schemas and the server settings.

    Args:
        settings: defaults (``refine_default_*``) and limits (``max_keywords``, ``max_candidates``,
            ``max_best_of``, ``max_stop_sequences``).
        term_names: names of the objective terms the refiner knows (weights may name only these).
        count_tokens: the number of tokens of a text in the model's tokenizer (keyword limits).
    """

    def __init__(
        self, settings: Settings, term_names: Iterable[str], count_tokens: Callable[[str], int]
    ) -> None:
        self.settings = settings
        self.term_names = tuple(term_names)
        self.count_tokens = count_tokens

    def refine_config(
        self, params: RefineParameters | None, field: str = "parameters.refine"
    ) -> RefineConfig | None:
        """The refinement of a request, or None for plain generation (``{"enabled": false}``)."""
        s = self.settings
        params = params or RefineParameters()
        enabled = s.refine_default_enabled if params.enabled is None else params.enabled
        if not enabled:
            return None
        if len(params.keywords) > s.max_keywords:
            raise ValidationFailed(
                f"{field}.keywords: at most {s.max_keywords} keywords, got {len(params.keywords)}: send fewer"
            )
        for k in params.keywords:
            if (n := self.count_tokens(" " + k)) > MAX_KEYWORD_TOKENS:
                raise ValidationFailed(
                    f"{field}.keywords: {k[:20]!r}... is {n} tokens long; a keyword may have at most "
                    f"{MAX_KEYWORD_TOKENS}: use a shorter word or phrase"
                )
        candidates = s.refine_default_candidates if params.candidates is None else params.candidates
        if candidates > s.max_candidates:
            raise ValidationFailed(
                f"{field}.candidates must be <= {s.max_candidates}, got {candidates}: ask for fewer"
            )
        unknown = sorted(set(params.weights) - set(self.term_names))
        if unknown:
            raise ValidationFailed(
                f"{field}.weights: unknown objective term(s) {', '.join(map(repr, unknown))}: "
                f"use {', '.join(self.term_names)}"
            )
        try:
            return RefineConfig(
                method=params.method or s.refine_default_method,
                steps=params.steps or s.refine_default_steps,
                candidates=candidates,
                keywords=tuple(params.keywords),
                length_penalty=params.length_penalty,
                target_length=params.target_length,
                weights=dict(params.weights),
                step_size=params.step_size,
            )
        except InvalidRequestError as exc:
            raise ValidationFailed(f"{field}: {exc}") from exc

    def check_stop(self, stop: list[str], field: str = "parameters.stop") -> tuple[str, ...]:
        if len(stop) > self.settings.max_stop_sequences:
            raise ValidationFailed(
                f"{field}: at most {self.settings.max_stop_sequences} stop sequences, got {len(stop)}"
            )
        return tuple(stop)

    def check_best_of(self, best_of: int | None, field: str = "parameters.best_of") -> int:
        best_of = best_of or 1
        if best_of > self.settings.max_best_of:
            raise ValidationFailed(f"{field} must be <= {self.settings.max_best_of}, got {best_of}")
        return best_of

    def tgi_sampling(self, p: GenerateParameters, max_new_tokens: int) -> SamplingParams:
        """TGI parameters -> SamplingParams. Sampling is on when asked for or when a warper is set."""
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens,
                do_sample=p.sampling,
                temperature=p.temperature if p.temperature is not None else 1.0,
                top_k=p.top_k,
                top_p=p.top_p,
                repetition_penalty=p.repetition_penalty,
                seed=p.seed,
                stop=self.check_stop(p.stop),
            )
        except InvalidRequestError as exc:
            raise ValidationFailed(f"parameters: {exc}") from exc

    def greedy(self, max_new_tokens: int) -> SamplingParams:
        """Parameters of a job that generates nothing itself (``POST /refine``); the engine skips
        generation when the job carries ``output_ids``."""
        return SamplingParams(max_new_tokens=max(1, max_new_tokens))

    def openai_sampling(
        self,
        *,
        max_new_tokens: int,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        repetition_penalty: float | None,
        seed: int | None,
        stop: list[str],
    ) -> SamplingParams:
        """OpenAI parameters -> SamplingParams: temperature defaults to 1 (sampling); 0 (or below
        ``GREEDY_BELOW``, where dividing the logits would overflow) means greedy."""
        temperature = 1.0 if temperature is None else temperature
        if temperature < GREEDY_BELOW:
            temperature = 0.0
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else 1.0,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
                stop=self.check_stop(stop, "stop"),
            )
        except InvalidRequestError as exc:
            raise ValidationFailed(str(exc)) from exc
