"""What one refinement request asks for: the method, its budget and the objective's terms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from refiners.errors import InvalidRequestError
from refiners.keywords import keyword_forms
from refiners.methods import METHODS

# B, the candidates scored exactly per step. Each is scored twice (with and without the prompt), and
# exact scoring and the lookahead that screens for it are the step's main costs; the README's
# benchmark tables show what 6 buys and costs.
DEFAULT_CANDIDATES = 6
MAX_STEPS = 8
MAX_CANDIDATES = 512
MAX_KEYWORDS = 32
# A keyword is a word or a short phrase; the lookahead window and every placement grow with its tokens.
MAX_KEYWORD_CHARS = 64
MAX_KEYWORD_TOKENS = 16
# A reference is aligned to every candidate (an n x m dynamic programme per candidate).
MAX_REFERENCE_CHARS = 8000
# Weights only matter relative to each other and the defaults are 0.5 to 3, so 1000 already lets one
# term decide alone. Bounded so that weight * term value, and the gradient pass that back-propagates
# it, stay far inside float32 (3.4e38): a weight of 1e38 overflowed to inf.
MAX_WEIGHT = 1000.0
# GNMT's ((5 + n) / 6) ** alpha stays below float32's 3.4e38 for n up to ~390,000 tokens at alpha = 8:
# ln(3.4e38) = 88.7 >= 8 * ln((5 + n) / 6). At 100 it overflowed from 10 tokens and the logprob term
# silently became 0. GNMT's own alpha is 0.6 to 1.
MAX_LENGTH_PENALTY = 8.0


@dataclass
class RefineConfig:
    """Settings of one refinement request.

    Args:
        method: a name in ``refiners.methods.METHODS``: "coordinate" (default), "gradient", "hybrid".
        steps: refinement steps; each costs one gradient pass and one batched scoring pass.
        candidates: how many proposed edits are scored exactly per step (B).
        keywords: words or short phrases the output should contain (keyword-coverage term).
        length_penalty: GNMT alpha of the log-probability normalisation ((5 + n) / 6) ** alpha.
        target_length: wanted output length in tokens (length term); None disables the term.
        weights: weight of each term by name; a term it does not name takes its class's
            ``default_weight`` (``refiners.objective.DEFAULT_WEIGHTS`` for the built-in ones).
        step_size: eta of the continuous step of the "gradient" and "hybrid" methods, in units of
            the mean embedding norm.
        reference: a text the output should come closer to (reference term); None disables it.
        avoid: words or short phrases the output must not contain (avoid term; matched like keywords).
        stop: the stop sequences the output was generated with. Only its last token may complete one
            (where generation would have stopped), and the texts end after it, as generation's does.
    """

    method: str = "coordinate"
    steps: int = 1
    candidates: int = DEFAULT_CANDIDATES
    keywords: tuple[str, ...] = ()
    length_penalty: float = 1.0
    target_length: int | None = None
    weights: dict[str, float] = field(default_factory=dict)
    step_size: float = 1.0
    reference: str | None = None
    avoid: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.keywords = tuple(k.strip() for k in self.keywords if k and k.strip())
        self.stop = tuple(s for s in self.stop if s)
        self.avoid = tuple(a.strip() for a in self.avoid if a and a.strip())
        if self.method not in METHODS:
            raise InvalidRequestError(
                f"unknown refine method {self.method!r}: use one of {', '.join(METHODS)}"
            )
        if not 1 <= self.steps <= MAX_STEPS:
            raise InvalidRequestError(f"refine steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise InvalidRequestError(
                f"refine candidates must be between 1 and {MAX_CANDIDATES}, got {self.candidates}"
            )
        for kind, words in (("keywords", self.keywords), ("avoid", self.avoid)):
            if len(words) > MAX_KEYWORDS:
                raise InvalidRequestError(f"at most {MAX_KEYWORDS} {kind}, got {len(words)}")
            for k in words:
                if len(k) > MAX_KEYWORD_CHARS:
                    raise InvalidRequestError(
                        f"{kind}: {k[:20]!r}... has {len(k)} characters: at most {MAX_KEYWORD_CHARS}"
                    )
        if both := conflicting(self.keywords, self.avoid):
            raise InvalidRequestError(
                f"{', '.join(map(repr, both))} is both a keyword and a word to avoid: remove it from one list"
            )
        if self.reference is not None and not self.reference.strip():
            raise InvalidRequestError("reference is empty: send the text to come closer to, or leave it out")
        if not math.isfinite(self.length_penalty) or not 0 <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise InvalidRequestError(
                f"length_penalty must be between 0 and {MAX_LENGTH_PENALTY:g}, got {self.length_penalty}"
            )
        if self.target_length is not None and self.target_length < 1:
            raise InvalidRequestError(f"target_length must be >= 1 token, got {self.target_length}")
        if not math.isfinite(self.step_size) or self.step_size <= 0:
            raise InvalidRequestError(f"step_size must be > 0, got {self.step_size}")
        for name, w in self.weights.items():
            if not math.isfinite(w) or not 0 <= w <= MAX_WEIGHT:
                raise InvalidRequestError(
                    f"weight of term {name!r} must be a number >= 0 and <= {MAX_WEIGHT:g}, got {w}"
                )


def conflicting(keywords: tuple[str, ...], avoid: tuple[str, ...]) -> list[str]:
    """The keywords that some word to avoid also matches (they share an inflection: dog / dogs)."""
    avoided = set().union(*(keyword_forms(a) for a in avoid)) if avoid else set()
    return [k for k in keywords if keyword_forms(k) & avoided]
