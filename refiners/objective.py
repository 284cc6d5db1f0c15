"""The objective J(Y | X) a refinement maximises: a weighted sum of small, separately reported terms.

Every term scores a batch of C candidate outputs at once from a ``CandidateBatch`` (what one exact
forward pass gives) and returns a tensor of shape (C,). A term also owns its part of the step:
- ``differentiable`` terms are built from tensors of the pass, so their gradient steers the step;
- ``estimate`` gives the first-order change of the term for a ``Change`` (what an edit does to the
  output's token log-probabilities, its length and the phrases it writes); the methods rank edits by
  the weighted sum of these, plus the gradient's estimate of the edit's effect on later tokens;
- ``wanted`` names phrases whose writing would raise the term, which methods try to place.

Add a term by subclassing ``ObjectiveTerm`` and passing it to ``Refiner(extra_terms=[...])``; its
weight is read from ``RefineConfig.weights[term.name]``, else its class's ``default_weight``::

    class Politeness(ObjectiveTerm):
        name, default_weight = "politeness", 0.5
        def score(self, batch):
            return torch.tensor([float("please" in t.lower()) for t in batch.texts])

``RewardTerm`` wraps any ``str -> float`` function the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refiners.keywords import keyword_present

if TYPE_CHECKING:
    from refiners.config import RefineConfig
    from refiners.methods.base import StepInput

# The readings of an output the passes give: after its prompt, and on its own (after a
# document-start token; only when a weighted term needs it).
PROMPTED, FREE = "prompted", "free"


@dataclass
class CandidateBatch:
    """Exact results of one forward pass over C candidate outputs (L = longest output).

    Attributes:
        token_logprobs: (C, L) log p(y_t | X, y_<t) of every output token, 0 at padding.
        mask: (C, L) 1.0 for real output tokens (a final EOS included), 0.0 for padding.
        texts: decoded outputs (special tokens skipped), one per candidate.
        configs: the refine config of the request each candidate belongs to.
        prompt_attention: (C, P) for each prompt position j, sum over output positions t of the
            attention a_tj (mean over heads and layers); None unless a term needs it.
        prompt_mask: (C, P) 1.0 for real prompt tokens; None with ``prompt_attention``.
        free_token_logprobs: (C, L) log p(y_t | y_<t) of the output read on its own, after a
            document-start token instead of the prompt; None unless a term needs it.
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    texts: list[str]
    configs: list[RefineConfig]
    prompt_attention: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    free_token_logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def reading(self, name: str) -> torch.Tensor:
        """(C, L) token log-probabilities of the outputs under one reading (PROMPTED or FREE)."""
        values = self.token_logprobs if name == PROMPTED else self.free_token_logprobs
        if values is None:
            raise ValueError(f"this batch has no {name!r} reading: the term must set needs_free_context")
        return values


@dataclass
class Change:
    """Edits of one output as a first-order estimate sees them. Tensors share one shape (...): one
    value per edit, so a method can estimate every edit of a kind at once.

    Attributes:
        logprob_delta: per reading (PROMPTED, FREE), the change of the sum of the output's token
            log-probabilities, exact or estimated; readings the step did not run are absent.
        length_delta: change of the output length, in tokens.
        phrase: a phrase the edits write (e.g. a missing keyword), or None.
    """

    logprob_delta: dict[str, torch.Tensor]
    length_delta: int = 0
    phrase: str | None = None


class ObjectiveTerm:
    """One term of the objective. Subclasses set ``name`` and implement ``score``; they may also
    estimate edits (``estimate``) and name phrases worth writing (``wanted``)."""

    name: str = "term"
    default_weight: float = 1.0  # when the request's ``weights`` does not name the term
    differentiable: bool = False  # built from tensors of the pass, so it can steer the gradient
    needs_attention: bool = False
    needs_free_context: bool = False  # reads the FREE reading (a second, prompt-free row per output)

    def active(self, config: RefineConfig) -> bool:
        """Whether the term applies to a request (an inactive term scores 0 and is not reported).

        A term that needs extra model work (attention maps, prompt-free rows) runs only when weighted.
        """
        if self.needs_attention or self.needs_free_context:
            return config.weights.get(self.name, self.default_weight) > 0
        return True

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        """Return the (C,) unweighted value of the term for every candidate."""
        raise NotImplementedError

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor | float:
        """First-order change of the term's unweighted value under ``change`` (shape of its tensors).

        0 by default: a differentiable term still steers the estimates, through the gradient's
        estimate of an edit's effect on the tokens after it.
        """
        return 0.0

    def wanted(self, step: StepInput) -> list[str]:
        """Phrases absent from the step's output whose writing would raise the term (none by default)."""
        return []


def gnmt_length_normaliser(lengths: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """((5 + n) / 6) ** alpha, the length normalisation of GNMT beam search (Wu et al., 2016)."""
    return ((5.0 + lengths) / 6.0) ** alpha


class NormalisedLogProbTerm(ObjectiveTerm):
    """Sum of the output's token log-probabilities under one reading, divided by GNMT's
    ((5 + n) / 6) ** length_penalty. Subclasses choose the reading."""

    reading = PROMPTED
    differentiable = True

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        alpha = torch.tensor([c.length_penalty for c in batch.configs], device=batch.mask.device)
        summed = (batch.reading(self.reading) * batch.mask).sum(-1)
        return summed / gnmt_length_normaliser(batch.lengths, alpha)

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor | float:
        """The new sum over the new normaliser, minus the current value: exact when the delta is."""
        s, n, alpha = step.logprob_sum(self.reading), step.length, step.config.length_penalty
        new_n = torch.tensor(float(max(n + change.length_delta, 1)))
        current = s / gnmt_length_normaliser(torch.tensor(float(max(n, 1))), alpha)
        return (s + change.logprob_delta[self.reading]) / gnmt_length_normaliser(new_n, alpha) - current


class LogProbTerm(NormalisedLogProbTerm):
    """log p(Y | X), normalised: how likely the model finds the output as an answer to the prompt."""

    name = "logprob"


class FluencyTerm(NormalisedLogProbTerm):
    """The log-probability term of the output read on its own: log p(Y) instead of log p(Y | X).

    The prompt names the keywords, so under p(. | X) a keyword is likely almost anywhere and an
    awkward insertion costs little; a reader (or another model) sees the text alone. This term
    prices edits by how the text reads without the prompt: the output after a document-start token
    (``refiners.scoring.document_start_ids``), normalised like ``logprob``. It costs a second
    prompt-free row per output in the gradient and scoring passes, so it runs only when weighted.
    Half the weight of ``logprob``: it prices awkward insertions without vetoing every keyword.
    """

    name = "fluency"
    default_weight = 0.5
    reading = FREE
    needs_free_context = True


class LengthTerm(ObjectiveTerm):
    """-|n - target| / target when ``target_length`` is set: 0 at the target, -1 at twice it."""

    name = "length"

    def active(self, config: RefineConfig) -> bool:
        return config.target_length is not None

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        target = torch.tensor([float(c.target_length or 1) for c in batch.configs], device=batch.mask.device)
        return -(batch.lengths - target).abs() / target

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor | float:
        n, t = step.length, step.config.target_length or 1
        return (abs(n - t) - abs(n + change.length_delta - t)) / t


class KeywordCoverageTerm(ObjectiveTerm):
    """Number of requested keywords present in the text (``refiners.keywords.keyword_present``).

    Weighted 3 by default: the prompt asks for the keywords, and a missing one is the output's
    biggest flaw; at that weight an insertion pays when it reads about as well as the original.
    """

    name = "keywords"
    default_weight = 3.0

    def active(self, config: RefineConfig) -> bool:
        return bool(config.keywords)

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        counts = [sum(keyword_present(k, t) for k in c.keywords) for t, c in zip(batch.texts, batch.configs)]
        return torch.tensor(counts, dtype=torch.float32, device=batch.mask.device)

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor | float:
        return float(change.phrase is not None and change.phrase in self.wanted(step))

    def wanted(self, step: StepInput) -> list[str]:
        return [k for k in step.config.keywords if not keyword_present(k, step.text)]


class PromptCoverageTerm(ObjectiveTerm):
    """GNMT coverage penalty: sum over prompt tokens j of log(min(sum_t a_tj, 1)).

    a_tj is the attention from output position t to prompt position j, averaged over the heads and
    layers of the model. It is 0 when every prompt token received at least one unit of attention and
    grows negative for prompt tokens the output ignored. Needs attention maps (an eager-attention
    pass), so it is off by default and active only when weighted.
    """

    name = "prompt_coverage"
    default_weight = 0.0
    differentiable = True
    needs_attention = True

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        assert batch.prompt_attention is not None and batch.prompt_mask is not None
        covered = batch.prompt_attention.clamp(min=1e-9, max=1.0).log()
        return (covered * batch.prompt_mask).sum(-1)


class RewardTerm(ObjectiveTerm):
    """A non-differentiable reward over the decoded text, e.g. a classifier or a rule.

    Args:
        name: the term's name in weights and reports.
        fn: ``text -> float``; larger is better.
        default_weight: weight when the request does not set one.
    """

    def __init__(self, name: str, fn: Callable[[str], float], default_weight: float = 1.0) -> None:
        if not name or not callable(fn):
            raise ValueError("RewardTerm needs a non-empty name and a callable text -> float")
        self.name, self.fn, self.default_weight = name, fn, default_weight

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        return torch.tensor([float(self.fn(t)) for t in batch.texts], device=batch.mask.device)


# The built-in terms, by name: the one list of them. Their defaults are on the classes.
TERMS: dict[str, type[ObjectiveTerm]] = {
    t.name: t for t in (LogProbTerm, FluencyTerm, LengthTerm, KeywordCoverageTerm, PromptCoverageTerm)
}
DEFAULT_WEIGHTS: dict[str, float] = {name: term.default_weight for name, term in TERMS.items()}


def default_terms() -> list[ObjectiveTerm]:
    return [term() for term in TERMS.values()]


class Objective:
    """A weighted list of terms. Weights come from each request's ``RefineConfig``.

    >>> objective = Objective(default_terms())
    >>> total, parts = objective.evaluate(batch)   # total: (C,), parts: {name: (C,)}
    """

    def __init__(self, terms: Sequence[ObjectiveTerm]) -> None:
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"objective term names must be unique, got {names}")
        self.terms = list(terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def weight(self, term: ObjectiveTerm, config: RefineConfig) -> float:
        """The term's weight for a request: 0 when inactive, else the request's or the default."""
        return config.weights.get(term.name, term.default_weight) if term.active(config) else 0.0

    def active_terms(self, config: RefineConfig) -> list[ObjectiveTerm]:
        return [t for t in self.terms if t.active(config)]

    def weighted_terms(self, config: RefineConfig) -> list[tuple[ObjectiveTerm, float]]:
        """(term, weight) of the terms with a non-zero weight for the request."""
        return [(t, w) for t in self.terms if (w := self.weight(t, config)) > 0]

    def _weighted(self, configs: Sequence[RefineConfig]) -> list[ObjectiveTerm]:
        """The terms with a non-zero weight for some of ``configs``."""
        return [t for t in self.terms if any(self.weight(t, c) > 0 for c in configs)]

    def needs_attention(self, configs: Sequence[RefineConfig]) -> bool:
        return any(t.needs_attention for t in self._weighted(configs))

    def needs_free_context(self, configs: Sequence[RefineConfig]) -> bool:
        return any(t.needs_free_context for t in self._weighted(configs))

    def evaluate(
        self, batch: CandidateBatch, differentiable_only: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the weighted total (C,) and each term's unweighted values {name: (C,)}.

        Inactive terms (for every candidate) are skipped; ``differentiable_only`` keeps only the
        terms that can steer a gradient.
        """
        total = torch.zeros(batch.mask.shape[0], device=batch.mask.device, dtype=batch.token_logprobs.dtype)
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            if differentiable_only and not term.differentiable:
                continue
            weights = torch.tensor(
                [self.weight(term, c) for c in batch.configs], device=total.device, dtype=total.dtype
            )
            if not any(term.active(c) for c in batch.configs):
                continue
            if term.needs_attention and not bool((weights > 0).any()):
                continue
            values = term.score(batch).to(total.dtype)
            parts[term.name] = values
            total = total + weights * values
        return total, parts

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor:
        """First-order change of J under ``change``: the weighted sum of the terms' estimates."""
        gain: torch.Tensor | float = 0.0
        for term, weight in self.weighted_terms(step.config):
            gain = gain + weight * term.estimate(step, change)
        shape = next(iter(change.logprob_delta.values())).shape if change.logprob_delta else ()
        return torch.as_tensor(gain, dtype=torch.float32).expand(shape)

    def wanted(self, step: StepInput) -> dict[str, float]:
        """{phrase: weight} of the phrases weighted terms want written, in the terms' order."""
        out: dict[str, float] = {}
        for term, weight in self.weighted_terms(step.config):
            for phrase in term.wanted(step):
                out[phrase] = out.get(phrase, 0.0) + weight
        return out

    def report(self, total: float, parts: dict[str, float], config: RefineConfig) -> dict[str, float]:
        """The ``{"total", <term>: value}`` dict of one candidate, with only its active terms."""
        out = {"total": float(total)}
        for term in self.active_terms(config):
            if term.name in parts and not (term.needs_attention and self.weight(term, config) == 0):
                v = float(parts[term.name])
                out[term.name] = v if math.isfinite(v) else float("-inf")
        return out
