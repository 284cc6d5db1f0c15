"""What every refinement method sees (``StepInput``) and returns (``Proposal``), and the vocabulary.

A method turns one gradient pass into candidate outputs (``propose``), single edits and stacks of
them. The ``Refiner`` scores every proposal of every request in one batched pass and keeps a candidate
only when it raises the objective.
Methods estimate edits through ``StepInput.estimate`` (the objective's terms own the estimates) and may
call the step's ``Lookahead`` to make single edits' estimates exact over their own tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from refiners.edits import Edit, apply_edits
from refiners.keywords import inflections, keyword_spans
from refiners.objective import Change, Objective
from refiners.search import SearchConfig

if TYPE_CHECKING:
    from refiners.config import RefineConfig
    from refiners.lookahead import Lookahead


class Vocabulary:
    """Which tokens a refinement may write, and how words are split into tokens.

    Special and added tokens (EOS, chat markers, padding) are never proposed, and neither are ids
    past the tokenizer's vocabulary (padding rows of the embedding matrix).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        embedding: torch.Tensor,
        table_product: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.embedding = embedding  # (V, d), the model's input embedding matrix
        self._table_product = table_product
        vocab_size = embedding.shape[0]
        allowed = torch.zeros(vocab_size, dtype=torch.bool, device=embedding.device)
        allowed[: min(len(tokenizer), vocab_size)] = True
        # Added tokens are control tokens, never written, except runs of whitespace that a vocabulary
        # adds as whole tokens (Gemma's "\n\n"): those are text, and an output ending in one must stay
        # editable.
        added = getattr(tokenizer, "added_tokens_decoder", {})
        special = set(tokenizer.all_special_ids) | {
            i for i, t in added.items() if str(t).strip() or getattr(t, "special", False)
        }
        for i in special:
            if 0 <= i < vocab_size:
                allowed[i] = False
        self.allowed = allowed  # (V,)
        self._allowed_on_host = allowed.tolist()  # read token by token (on a GPU, a sync each)
        self.special_ids = special
        pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
        # A token starts a word when it carries the tokenizer's space marker or is not alphanumeric.
        self.starts_word = [
            bool(p) and (p[0] in "Ġ▁ " or not p[0].isalnum())
            for p in (pieces + [""] * (vocab_size - len(pieces)))
        ]
        self._forms: dict[str, list[tuple[int, ...]]] = {}

    def times_table(self, x: torch.Tensor) -> torch.Tensor:
        """(m, V) products ``x @ E.T`` of m vectors with every token's embedding (``table_product``
        when given: a tied head's packed weight is this table, and its product is faster)."""
        return self._table_product(x) if self._table_product is not None else x @ self.embedding.T

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def round_trips(self, body: Sequence[int]) -> bool:
        """True when decoding then encoding gives back ``body`` and it holds no special token: only
        then is the score of a candidate the score of the text it returns."""
        if not body or any(t in self.special_ids for t in body):
            return False
        return self.tokenizer.encode(self.decode(body), add_special_tokens=False) == list(body)

    def keyword_spellings(self, keyword: str) -> list[tuple[int, ...]]:
        """Token ids of ``" form"`` for each inflection of the keyword, as written mid-sentence."""
        if keyword not in self._forms:
            words = keyword.split()
            out = []
            for form in inflections(words[-1]):
                text = " " + " ".join([*words[:-1], form])
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and all(self._allowed_on_host[i] for i in ids):
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
        config: the request's refine config.
        row: the request's row in the step's prompt state (where its lookahead runs).
        total: exact objective of the current output; ``parts``: its term values.
        distributions: per reading (``refiners.objective.PROMPTED``, and ``FREE`` when a weighted
            term reads the output on its own), (m + 1, V) log p(. | context, y_<i) at body positions
            0..m (m = where EOS or an appended token goes).
        embeds: (m, d) input embeddings of the body; grad: (m, d) dJ/d embeds of the smooth terms.
        vocab: the shared ``Vocabulary``; ``objective``: the terms that estimate edits.
    """

    body: list[int]
    tail: list[int]
    text: str
    config: RefineConfig
    row: int
    total: float
    parts: dict[str, float]
    distributions: dict[str, torch.Tensor]
    embeds: torch.Tensor
    grad: torch.Tensor
    vocab: Vocabulary
    objective: Objective

    @property
    def length(self) -> int:
        """n, the output length the objective sees (EOS included)."""
        return len(self.body) + len(self.tail)

    @cached_property  # read by every estimate: computed once per step
    def token_logprobs(self) -> dict[str, torch.Tensor]:
        """Per reading, (n,) the log-probability of each current output token."""
        ids = torch.tensor(self.body + self.tail, dtype=torch.long)
        return {r: d[torch.arange(len(ids)), ids] for r, d in self.distributions.items()}

    @cached_property
    def logprob_prefix_sums(self) -> dict[str, list[float]]:
        """Per reading, the sums of the first k token log-probabilities, k = 0..n, on the host: read
        for every estimate, one device->host copy per step."""
        return {r: [0.0, *itertools.accumulate(lp.tolist())] for r, lp in self.token_logprobs.items()}

    def logprob_sum(self, reading: str) -> float:
        """S, the sum of the current output's token log-probabilities under ``reading``."""
        return self.logprob_prefix_sums[reading][-1]

    @cached_property
    def wanted(self) -> dict[str, float]:
        """{phrase: weight} of absent phrases the objective's terms would gain by (missing keywords)."""
        return self.objective.wanted(self)

    @cached_property
    def unwanted(self) -> list[str]:
        """Present phrases the objective's terms would gain by removing (words to avoid)."""
        return self.objective.unwanted(self)

    def allows(self, body: list[int]) -> bool:
        """Whether the objective's terms let ``body`` replace the output (no keyword lost, no word to
        avoid written): a candidate they veto is never scored, so it should not take the budget."""
        return self.objective.allows(self, self.vocab.decode(body))

    def per_reading(self, delta: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``delta(distribution)`` for the distribution of every reading: an edit's change of S."""
        return {r: delta(d) for r, d in self.distributions.items()}

    def estimate(
        self,
        logprob_delta: dict[str, torch.Tensor],
        length_delta: int = 0,
        phrase: str | None = None,
        body: list[int] | None = None,
    ) -> torch.Tensor:
        """First-order change of J for edits that change each reading's S by ``logprob_delta``, the
        length by ``length_delta`` and write ``phrase`` (making one candidate ``body``, when given):
        the objective's terms estimate it."""
        return self.objective.estimate(self, Change(logprob_delta, length_delta, phrase, body))


@dataclass(frozen=True)
class Proposal:
    """A candidate output for one request, and the edits that make it from the current body."""

    edits: list[Edit]
    estimate: float = 0.0
    phrase: str | None = None  # the wanted phrase (e.g. a missing keyword) this proposal writes
    body: list[int] = field(default_factory=list)


def make_proposal(step: StepInput, edits: list[Edit], estimate: float, phrase: str | None = None) -> Proposal:
    return Proposal(edits, estimate, phrase, apply_edits(step.body, edits))


def token_spans(step: StepInput, phrase: str) -> list[tuple[int, int]]:
    """The [start, end) token ranges of the body that hold each occurrence of ``phrase`` in its text."""
    ends = [len(step.vocab.decode(step.body[: i + 1])) for i in range(len(step.body))]
    spans = []
    for a, b in keyword_spans(phrase, step.vocab.decode(step.body)):
        first = next(i for i, end in enumerate(ends) if end > a)
        last = next((i for i, end in enumerate(ends) if end >= b), len(ends) - 1)
        spans.append((first, last + 1))
    return spans


def dedupe(proposals: Sequence[Proposal], current: list[int], budget: int) -> list[Proposal]:
    """Keep the first proposal of each distinct output, never the unchanged one, at most ``budget``."""
    seen = {tuple(current)}
    out = []
    for p in proposals:
        key = tuple(p.body)
        if key not in seen:
            seen.add(key)
            out.append(p)
        if len(out) == budget:
            break
    return out


class RefinementMethod:
    """Interface of a refinement method: a batch of gradient passes in, candidate outputs out.

    Args:
        search: the step's tuning constants (budget splits, lookahead thresholds).
    """

    name = "method"

    def __init__(self, search: SearchConfig | None = None) -> None:
        self.search = search or SearchConfig()

    def propose(self, steps: Sequence[StepInput], lookahead: Lookahead) -> list[list[Proposal]]:
        """For each request, at most ``config.candidates`` candidate outputs to score exactly, and
        stacks of its single edits (at most ``SearchConfig.combined_edits`` - 1 more).

        ``lookahead(steps, shortlists)`` makes single edits' estimates exact over their tokens and the
        few after them, for all the requests in one batched pass.
        """
        raise NotImplementedError
