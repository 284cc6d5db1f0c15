"""The objective J(Y | X) a refinement maximises: a weighted sum of small, separately reported terms.

Every term scores a batch of C candidate outputs at once from a ``CandidateBatch`` (what one exact
forward pass gives) and returns a tensor of shape (C,). A term also owns its part of the step:
- ``differentiable`` terms are built from tensors of the pass, so their gradient steers the step;
- ``estimate`` gives the first-order change of the term for a ``Change`` (what an edit does to the
  output's token log-probabilities, its length and the phrases it writes); the methods rank edits by
  the weighted sum of these, plus the gradient's estimate of the edit's effect on later tokens;
- ``wanted`` names phrases whose writing would raise the term, which methods try to place;
  ``unwanted`` names present phrases whose removal would raise it, which methods try to delete or replace;
- ``allows`` vetoes a candidate before it is scored (a keyword lost, a word to avoid written).

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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from refiners.alignment import align
from refiners.keywords import keyword_present

if TYPE_CHECKING:
    from refiners.config import RefineConfig
    from refiners.methods.base import StepInput
    from refiners.models import LoadedModel

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
        ids: (C, L) the output token ids (padding past ``mask``).
        embeds: (C, L, d) their input embeddings; in the gradient pass the tensor the gradient is
            taken with respect to.
        prompts: the decoded prompt of each candidate's request (special tokens skipped).
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    texts: list[str]
    configs: list[RefineConfig]
    prompt_attention: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    free_token_logprobs: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)

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
        body: for a single candidate, its whole output (no EOS), so terms that can value a text
            without a forward pass (the reference's alignment) estimate it exactly; None for a tensor
            of edits.
    """

    logprob_delta: dict[str, torch.Tensor]
    length_delta: int = 0
    phrase: str | None = None
    body: list[int] | None = None


class ObjectiveTerm:
    """One term of the objective. Subclasses set ``name`` and implement ``score``; they may also
    estimate edits (``estimate``) and name phrases worth writing (``wanted``)."""

    name: str = "term"
    default_weight: float = 1.0  # when the request's ``weights`` does not name the term
    differentiable: bool = False  # built from tensors of the pass, so it can steer the gradient
    needs_attention: bool = False
    needs_free_context: bool = False  # reads the FREE reading (a second, prompt-free row per output)

    @classmethod
    def for_model(cls, loaded: LoadedModel) -> ObjectiveTerm:
        """The term for a loaded model (terms that read its tokenizer or embeddings override this)."""
        return cls()

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

    def unwanted(self, step: StepInput) -> list[str]:
        """Phrases present in the step's output whose removal would raise the term (none by default)."""
        return []

    def allows(self, step: StepInput, text: str) -> bool:
        """Whether a candidate text may replace the step's output at all (checked before scoring)."""
        return True


def gnmt_length_normaliser(
    lengths: torch.Tensor | float, alpha: torch.Tensor | float
) -> torch.Tensor | float:
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
        # Plain floats: this runs for every shortlisted edit, and scalar tensors cost more than the math.
        scale = 1.0 / gnmt_length_normaliser(float(max(n + change.length_delta, 1)), alpha)
        current = s / gnmt_length_normaliser(float(max(n, 1)), alpha)
        # (s + delta) * scale - current, in one pass over an (m, V) delta.
        return torch.add(torch.tensor(s * scale - current), change.logprob_delta[self.reading], alpha=scale)


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
    Weight 0.75: the largest coverage gain on the tuning sets that left the text's median perplexity
    read alone by the model within +3% (0.5 gave +15%; ``benchmarks/README.md``).
    """

    name = "fluency"
    default_weight = 0.75
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

    def allows(self, step: StepInput, text: str) -> bool:
        """A keyword present stays present: an edit may not trade one keyword for another."""
        return all(keyword_present(k, text) for k in step.config.keywords if keyword_present(k, step.text))


class AvoidTerm(ObjectiveTerm):
    """Minus the number of words to avoid (``refine.avoid``) present in the text, matched like keywords.

    Methods propose deleting or replacing the present ones (``unwanted``); a candidate that writes one
    the output did not have is never scored (``allows``), whatever the other terms would gain.
    """

    name = "avoid"
    default_weight = 3.0  # as much as a keyword: removing a word to avoid is worth a small fluency cost

    def active(self, config: RefineConfig) -> bool:
        return bool(config.avoid)

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        counts = [-sum(keyword_present(a, t) for a in c.avoid) for t, c in zip(batch.texts, batch.configs)]
        return torch.tensor(counts, dtype=torch.float32, device=batch.mask.device)

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor | float:
        return float(change.phrase is not None and change.phrase in self.unwanted(step))

    def unwanted(self, step: StepInput) -> list[str]:
        return [a for a in step.config.avoid if keyword_present(a, step.text)]

    def allows(self, step: StepInput, text: str) -> bool:
        return not any(
            keyword_present(a, text) and not keyword_present(a, step.text) for a in step.config.avoid
        )


# The reference term reads output token y_t as q_t(v) ∝ exp(REFERENCE_SHARPNESS * cos(e_t, E_v)). A pair
# costs sharpness * (1 - cos), capped at a gap: a different token costs what Levenshtein charges, and
# only near-identical ones (cos > 0.75: " Dog" / " dog") earn partial credit. Uncapped, rare tokens
# near many others (SmolLM2's " enthus", norm 7) matched every reference token a little, and one step
# wrote them into the text to raise the term.
REFERENCE_SHARPNESS = 4.0
REFERENCE_GAP = 1.0  # an unpaired token of either side; also the cap of a pair
# Missing reference words offered as phrases to place per step: placements are screened by a lookahead,
# so each costs rows.
REFERENCE_WANTED = 2


class ReferenceTerm(ObjectiveTerm):
    """Minus the cross-entropy of the reference under the output, on an alignment (``refine.reference``).

    Each output token y_t is read as a distribution over tokens through its input embedding e_t:
    q_t(v) ∝ exp(beta * cos(e_t, E_v)), beta = ``REFERENCE_SHARPNESS``, so that reading reference
    token r at t costs -log q_t(r) + log q_t(y_t) = beta * (1 - cos(e_t, E_r)) nats more than the
    token written there: 0 when y_t = r. The reference R = r_1..r_m (tokenised like the output) is
    aligned to the output by the monotone alignment of least total cost (``refiners.alignment.align``):
    a pair (t, j) costs min(beta * (1 - cos(e_t, E_{r_j})), GAP), a token of either side left unpaired
    costs ``REFERENCE_GAP`` (1). The term is

        reference(Y) = -(sum over pairs of min(beta * (1 - cos), GAP) + GAP * unpaired) / m

    With only exact matches this is minus the Levenshtein distance between the token sequences over
    the reference length: 0 when the output is the reference, and it rises as the output comes closer.
    Normalised by m, not n: a shorter output does not score better by being short. Special tokens of
    the output (a final EOS) are not aligned.

    Steering: the alignment is chosen on the current values, and the gradient flows through every
    pair's uncapped cost (straight through the cap), so each output token is pulled towards the
    reference token it is paired with; the replacements the gradient ranks first are those. A single
    candidate's value needs no forward pass, so the lookahead's estimate of it is exact, and a few of
    the reference's missing words at a time are offered as phrases to place.
    """

    name = "reference"
    default_weight = 32.0  # the tuning in benchmarks/README.md: 4 and 8 moved no output closer
    differentiable = True

    def __init__(self, tokenizer, embedding: torch.nn.Module) -> None:
        self.tokenizer, self.embedding = tokenizer, embedding
        self.special = set(tokenizer.all_special_ids)
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, loaded: LoadedModel) -> ObjectiveTerm:
        return cls(loaded.tokenizer, loaded.model.get_input_embeddings())

    def active(self, config: RefineConfig) -> bool:
        return config.reference is not None

    def reference_embeds(self, reference: str) -> torch.Tensor:
        """(m, d) unit input embeddings of the reference's tokens (cached: one per text)."""
        if reference not in self._cache:
            ids = self.tokenizer.encode(reference.strip(), add_special_tokens=False)
            weight = self.embedding.weight
            with torch.no_grad():
                embeds = self.embedding(torch.tensor(ids, dtype=torch.long, device=weight.device)).float()
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[reference] = torch.nn.functional.normalize(embeds, dim=-1)
        return self._cache[reference]

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        assert batch.ids is not None and batch.embeds is not None
        values = []
        for c, config in enumerate(batch.configs):
            if config.reference is None:
                values.append(batch.embeds.new_zeros((), dtype=torch.float32))
                continue
            ids = batch.ids[c, : int(batch.mask[c].sum())].tolist()
            keep = [t for t, i in enumerate(ids) if i not in self.special]
            values.append(self._aligned(batch.embeds[c, keep], config.reference))
        return torch.stack(values)

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor | float:
        """Exact for a single candidate (its alignment needs no forward pass), else 0: the gradient
        steers replacements, and a missing reference word's placements are valued once they are
        single candidates."""
        if change.body is None or step.config.reference is None:
            return 0.0
        return self.value(change.body, step.config.reference) - self.value(step.body, step.config.reference)

    def value(self, ids: Sequence[int], reference: str) -> float:
        """The term for output ``ids`` (special tokens ignored)."""
        kept = [i for i in ids if i not in self.special]
        with torch.no_grad():
            embeds = self.embedding(torch.tensor(kept, dtype=torch.long, device=self.embedding.weight.device))
        return float(self._aligned(embeds, reference))

    def _aligned(self, embeds: torch.Tensor, reference: str) -> torch.Tensor:
        """-(pair costs + GAP * unpaired) / m for the output embeddings ``embeds`` (n, d).

        The value uses the capped costs; its gradient is the uncapped costs' (straight through), so
        every pair pulls its output token towards its reference token, not only the near ones."""
        ref = self.reference_embeds(reference)
        soft = REFERENCE_SHARPNESS * (1.0 - torch.nn.functional.normalize(embeds.float(), dim=-1) @ ref.T)
        capped = soft.clamp(max=REFERENCE_GAP)
        pairs, unpaired = align(capped.detach().double().cpu().numpy(), REFERENCE_GAP)
        rows, cols = [t for t, _ in pairs], [j for _, j in pairs]
        pulled = soft[rows, cols].sum()
        paired = capped[rows, cols].sum().detach() + pulled - pulled.detach()
        return -(paired + REFERENCE_GAP * unpaired) / ref.shape[0]

    def wanted(self, step: StepInput) -> list[str]:
        words = dict.fromkeys(re.findall(r"[A-Za-z]+(?:'[a-z]+)?", step.config.reference or ""))
        return [w for w in words if not keyword_present(w, step.text)][:REFERENCE_WANTED]


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
    t.name: t
    for t in (
        LogProbTerm,
        FluencyTerm,
        LengthTerm,
        KeywordCoverageTerm,
        AvoidTerm,
        ReferenceTerm,
        PromptCoverageTerm,
    )
}
DEFAULT_WEIGHTS: dict[str, float] = {name: term.default_weight for name, term in TERMS.items()}


def default_terms(loaded: LoadedModel | None = None) -> list[ObjectiveTerm]:
    """The built-in terms; without a model, those that read its tokenizer or embeddings are left out."""
    if loaded is not None:
        return [term.for_model(loaded) for term in TERMS.values()]
    return [term() for term in TERMS.values() if term.for_model.__func__ is ObjectiveTerm.for_model.__func__]


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
            values = term.score(batch).to(total.device, total.dtype)  # a custom term may score on the CPU
            parts[term.name] = values
            total = total + weights * values
        return total, parts

    def estimate(self, step: StepInput, change: Change) -> torch.Tensor:
        """First-order change of J under ``change``: the weighted sum of the terms' estimates."""
        delta = next(iter(change.logprob_delta.values()), None)
        gain: torch.Tensor | None = None
        constant = 0.0  # the terms that estimate a float add up on the host
        for term, weight in self.weighted_terms(step.config):
            value = term.estimate(step, change)
            if not isinstance(value, torch.Tensor):
                constant += weight * value
            elif gain is None:  # at most one pass per term over an (m, V) estimate (never in place)
                gain = value.float() if weight == 1 else value.float() * weight
            else:
                gain = gain.add(value.float(), alpha=weight)
        if gain is None:
            # On the deltas' device: a CPU scalar would meet CUDA tensors.
            gain = torch.tensor(constant, device=delta.device if delta is not None else None)
        elif constant:
            gain = gain + constant
        return gain.expand(delta.shape if delta is not None else gain.shape)

    def wanted(self, step: StepInput) -> dict[str, float]:
        """{phrase: weight} of the phrases weighted terms want written, in the terms' order."""
        out: dict[str, float] = {}
        for term, weight in self.weighted_terms(step.config):
            for phrase in term.wanted(step):
                out[phrase] = out.get(phrase, 0.0) + weight
        return out

    def unwanted(self, step: StepInput) -> list[str]:
        """The present phrases weighted terms want removed, in the terms' order."""
        return list(
            dict.fromkeys(p for term, _ in self.weighted_terms(step.config) for p in term.unwanted(step))
        )

    def allows(self, step: StepInput, text: str) -> bool:
        """Whether every weighted term lets ``text`` replace the step's output."""
        return all(term.allows(step, text) for term, _ in self.weighted_terms(step.config))

    def report(self, total: float, parts: dict[str, float], config: RefineConfig) -> dict[str, float]:
        """The ``{"total", <term>: value}`` dict of one candidate, with only its active terms."""
        out = {"total": float(total)}
        for term in self.active_terms(config):
            if term.name in parts and not (term.needs_attention and self.weight(term, config) == 0):
                v = float(parts[term.name])
                out[term.name] = v if math.isfinite(v) else float("-inf")
        return out
