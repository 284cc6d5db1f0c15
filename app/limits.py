"""The rules of a request that depend on the settings or on the loaded model.

A field's static bounds are pydantic constraints in ``app.schemas``, the token limits of prompts and
outputs are ``app.tokenization.PromptTokenizer``'s and a request's cost is ``app.admission``'s. What
is left depends on the settings (how many keywords, candidates, stop sequences and best_of samples a
request may ask for) or on the model (a keyword's length in its tokens, the objective's term names):
each of those rules is one method here, called by the schemas' conversions (``to_sampling_params``,
``to_refine_config``), so the engine only receives jobs it can run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from app.errors import ValidationFailed
from app.settings import Settings
from refiners.config import MAX_KEYWORD_TOKENS
from refiners.reward import RewardModelTerm

REWARD_TERM = RewardModelTerm.name


@dataclass(frozen=True)
class RequestLimits:
    """What the running service allows a request.

    Args:
        settings: the limits (``max_keywords``, ``max_candidates``, ``max_best_of``,
            ``max_stop_sequences``) and the refinement defaults (``refine_default_*``).
        term_names: names of the objective terms the refiner knows (weights may name only these).
        count_tokens: the number of tokens of a text in the model's tokenizer (keyword lengths).

    Each check takes ``field``, the request's path to the value, for the message.
    """

    settings: Settings
    term_names: tuple[str, ...]
    count_tokens: Callable[[str], int]

    def best_of(self, best_of: int | None, field: str) -> int:
        """The number of sequences to sample (1 when not asked for), at most ``max_best_of``."""
        best_of = best_of or 1
        if best_of > self.settings.max_best_of:
            raise ValidationFailed(f"{field} must be <= {self.settings.max_best_of}, got {best_of}")
        return best_of

    def stop(self, stop: Sequence[str], field: str) -> tuple[str, ...]:
        """The stop sequences, at most ``max_stop_sequences`` of them."""
        if len(stop) > self.settings.max_stop_sequences:
            raise ValidationFailed(
                f"{field}: at most {self.settings.max_stop_sequences} stop sequences, got {len(stop)}"
            )
        return tuple(stop)

    def keywords(self, keywords: Sequence[str], field: str) -> tuple[str, ...]:
        """The keywords, at most ``max_keywords`` of them and each at most ``MAX_KEYWORD_TOKENS`` long."""
        if len(keywords) > self.settings.max_keywords:
            raise ValidationFailed(
                f"{field}: at most {self.settings.max_keywords} keywords, got {len(keywords)}: send fewer"
            )
        for k in keywords:
            if (n := self.count_tokens(" " + k)) > MAX_KEYWORD_TOKENS:
                raise ValidationFailed(
                    f"{field}: {k[:20]!r}... is {n} tokens long; a keyword may have at most "
                    f"{MAX_KEYWORD_TOKENS}: use a shorter word or phrase"
                )
        return tuple(keywords)

    def candidates(self, candidates: int | None, field: str) -> int:
        """The candidates scored per step (the server default when not asked for), at most
        ``max_candidates``."""
        candidates = self.settings.refine_default_candidates if candidates is None else candidates
        if candidates > self.settings.max_candidates:
            raise ValidationFailed(
                f"{field} must be <= {self.settings.max_candidates}, got {candidates}: ask for fewer"
            )
        return candidates

    def reference(self, reference: str | None, field: str) -> str | None:
        """The reference text, at most ``max_input_tokens`` long (it is aligned to every candidate)."""
        if reference is not None and (n := self.count_tokens(reference)) > self.settings.max_input_tokens:
            raise ValidationFailed(
                f"{field} is {n} tokens long; at most {self.settings.max_input_tokens}: send a shorter one"
            )
        return reference

    def weights(self, weights: Mapping[str, float], field: str) -> dict[str, float]:
        """The weights by term name; every name must be a term of the objective."""
        unknown = sorted(set(weights) - set(self.term_names))
        if REWARD_TERM in unknown:
            raise ValidationFailed(
                f"{field}.{REWARD_TERM}: this server has no reward model: start it with --reward-model PATH "
                f"(or REFINER_REWARD_MODEL), or leave the weight out"
            )
        if unknown:
            raise ValidationFailed(
                f"{field}: unknown objective term(s) {', '.join(map(repr, unknown))}: "
                f"use {', '.join(self.term_names)}"
            )
        return dict(weights)
