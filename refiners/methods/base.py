"""What every refinement method sees (``StepInput``) and returns (``Proposal``), and the vocabulary.

A method turns one gradient pass into candidate outputs (``propose``) and, once those are scored
exactly, may offer combinations of the improving ones (``combine``). The ``Refiner`` scores every
proposal of every request in one batched pass and keeps a candidate only when it raises the objective.
A method may first ``shortlist`` single edits for a lookahead: the refiner replaces their estimates
by exact values over the edit's tokens and the few after it, so ``propose`` ranks them well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from transformers import PreTrainedTokenizerBase

from refiners.config import RefineConfig
from refiners.edits import Edit, apply_edits
from refiners.keywords import inflections
from refiners.objective import gnmt_length_normaliser


class Vocabulary:
    """Which tokens a refinement may write, and how words are split into tokens.

    Special and added tokens (EOS, chat markers, padding) are never proposed, and neither are ids
    past the tokenizer's vocabulary (padding rows of the embedding matrix).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, embedding: torch.Tensor) -> None:
        self.tokenizer = tokenizer
        self.embedding = embedding  # (V, d), the model's input embedding matrix
        vocab_size = embedding.shape[0]
        allowed = torch.zeros(vocab_size, dtype=torch.bool, device=embedding.device)
        allowed[: min(len(tokenizer), vocab_size)] = True
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
        for i in special:
            if 0 <= i < vocab_size:
                allowed[i] = False
        self.allowed = allowed  # (V,)
        self.special_ids = special
        pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
        # A token starts a word when it carries the tokenizer's space marker or is not alphanumeric.
        self.starts_word = [
            bool(p) and (p[0] in "Ġ▁ " or not p[0].isalnum())
            for p in (pieces + [""] * (vocab_size - len(pieces)))
        ]
        self._forms: dict[str, list[tuple[int, ...]]] = {}

    def keyword_spellings(self, keyword: str) -> list[tuple[int, ...]]:
        """Token ids of ``" form"`` for each inflection of the keyword, as written mid-sentence."""
        if keyword not in self._forms:
            words = keyword.split()
            out = []
            for form in inflections(words[-1]):
                text = " " + " ".join([*words[:-1], form])
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and all(self.allowed[i] for i in ids):
                    out.append(ids)
            self._forms[keyword] = list(dict.fromkeys(out))
        return self._forms[keyword]


@dataclass
class StepInput:
    """One request's state at the start of a step, from the gradient pass.

    Attributes:
        body: current output ids without the final EOS (m tokens).
        tail: [eos] when the output ends with EOS, else [].
        text: decoded current output.
        config: the request's refine config; ``weights``: resolved weight of each term.
        total: exact objective of the current output; ``parts``: its term values.
        logprobs: (m + 1, V) at body positions 0..m (m = where EOS / a new token goes), the weighted
            sum of the log-probability terms' token distributions: w_logprob * log p(. | X, y_<i)
            (+ w_fluency * log p(. | y_<i) when the fluency term is on).
        embeds: (m, d) input embeddings of the body; grad: (m, d) dJ/d embeds of the smooth terms.
        missing_keywords: requested keywords the current text does not contain.
        vocab: the shared ``Vocabulary``.
    """

    body: list[int]
    tail: list[int]
    text: str
    config: RefineConfig
    weights: dict[str, float]
    total: float
    parts: dict[str, float]
    logprobs: torch.Tensor
    embeds: torch.Tensor
    grad: torch.Tensor
    missing_keywords: list[str]
    vocab: Vocabulary

    @property
    def length(self) -> int:
        """n, the output length the objective sees (EOS included)."""
        return len(self.body) + len(self.tail)

    @cached_property  # read by every estimate: computed once per step
    def token_logprobs(self) -> torch.Tensor:
        """(n,) the (weighted) log-probability of each current output token (gradient pass)."""
        ids = self.body + self.tail
        return self.logprobs[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)]

    @cached_property
    def logprob_sum(self) -> float:
        """S, the (weighted) unnormalised sum of output token log-probabilities."""
        return float(self.token_logprobs.sum())

    def estimated_gain(
        self, delta_logprob: torch.Tensor, delta_length: int, delta_keywords: int = 0
    ) -> torch.Tensor:
        """First-order estimate of the change in J for edits that change S by ``delta_logprob``.

        Exact for the length and keyword terms; the log-probability terms use the estimated
        change of the (weighted) token log-probability sum and the exact new length normalisation.
        """
        s, n, alpha = self.logprob_sum, self.length, self.config.length_penalty
        w = self.weights
        new_n = n + delta_length
        gain = (s + delta_logprob) / gnmt_length_normaliser(
            torch.tensor(float(max(new_n, 1))), alpha
        ) - s / gnmt_length_normaliser(torch.tensor(float(max(n, 1))), alpha)
        if self.config.target_length:
            t = self.config.target_length
            gain = gain + w.get("length", 0.0) * (abs(n - t) - abs(new_n - t)) / t
        return gain + w.get("keywords", 0.0) * delta_keywords


@dataclass
class Proposal:
    """A candidate output for one request, and the edits that make it from the current body."""

    edits: list[Edit]
    estimate: float = 0.0
    keyword: str | None = None  # the missing keyword this proposal adds, if any
    body: list[int] = field(default_factory=list)


def make_proposal(inp: StepInput, edits: list[Edit], estimate: float, keyword: str | None = None) -> Proposal:
    return Proposal(edits, estimate, keyword, apply_edits(inp.body, edits))


class RefinementMethod:
    """Interface of a refinement method: one gradient pass in, candidate outputs out."""

    name = "method"

    def shortlist(self, inp: StepInput, budget: int) -> list[Proposal]:
        """Single-edit proposals worth a lookahead before ``propose`` ranks them (none by default)."""
        return []

    def propose(
        self, inp: StepInput, budget: int, shortlisted: Sequence[Proposal] | None = None
    ) -> list[Proposal]:
        """Return at most ``budget`` candidate outputs to score exactly. ``shortlisted``: this
        method's shortlist, with estimates made exact over each edit's lookahead window (edits that do
        not round-trip dropped); None when no lookahead was run."""
        raise NotImplementedError

    def combine(self, inp: StepInput, scored: list[tuple[Proposal, float]]) -> list[Proposal]:
        """Given exactly scored proposals (proposal, total), return combinations worth scoring too."""
        return []
