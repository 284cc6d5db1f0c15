"""The refiner: one (or ``steps``) gradient-guided refinement step(s) over a batch of outputs.

Per step, for the whole batch:
1. one gradient pass over the current outputs (their prompts were run once and their KV cache is
   reused) gives each request a ``StepInput``: exact scores, distributions, dJ/d embeddings;
2. each method proposes candidates for its requests (calling the step's ``Lookahead``, one short
   batched pass, to make its shortlisted edits' estimates exact over their own few tokens);
3. every candidate of every request, the methods' stacks of single edits included, is scored exactly
   in one batched pass (chunked);
4. a request keeps the best candidate only if it raises J.
Candidates are checked to round-trip through the tokenizer (decode then encode gives the same ids),
so the reported score is the score of the returned text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from refiners.config import RefineConfig
from refiners.cost import CostModel
from refiners.generation import end_at_stop
from refiners.lookahead import Lookahead
from refiners.methods import METHODS
from refiners.methods.base import Proposal, RefinementMethod, StepInput, Vocabulary
from refiners.models import LoadedModel
from refiners.objective import Objective, ObjectiveTerm, default_terms
from refiners.packed import PackedLinear
from refiners.result import RefineResult
from refiners.scoring import (
    Checkpoint,
    CurrentOutputs,
    ModelRunner,
    Outputs,
    PromptState,
    Scores,
    no_checkpoint,
)
from refiners.search import SearchConfig


@dataclass
class RefineRequest:
    """One output to refine.

    Args:
        prompt_ids: the prompt X, as the model saw it (chat template applied).
        output_ids: the initial output Y; a final EOS stays at the end.
        config: what to refine for (method, keywords, weights, ...).
        prompt_cache: the prompt's KV cache from generation (``GenerationOutput.prompt_cache``), so
            the refiner does not run the prompt again; None = run it.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    config: RefineConfig = field(default_factory=RefineConfig)
    prompt_cache: PromptState | None = None

    def __post_init__(self) -> None:
        if self.prompt_cache is not None and int(self.prompt_cache.lengths[0]) != len(self.prompt_ids):
            raise ValueError("prompt_cache is not the cache of prompt_ids (their lengths differ)")


@dataclass
class _Track:
    """A request's state across steps."""

    config: RefineConfig
    prompt: str  # decoded, for the terms that read it
    body: list[int]
    tail: list[int]
    text: str
    total: float = float("-inf")
    report: dict[str, float] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    initial_ids: list[int] = field(default_factory=list)
    edits: list[dict] = field(default_factory=list)
    candidates: int = 0
    steps: int = 0
    done: bool = False


class Refiner:
    """Refines outputs of a causal LM under an objective. Model weights are never updated.

    Args:
        loaded: the model and tokenizer (``refiners.models.load_model`` or ``prepare_model``).
        scoring_chunk_size: most outputs in one forward pass; default the device's: 64 on a CPU, 1024
            on a GPU (``refiners.cost.PassLimits``).
        extra_terms: custom objective terms added to the built-in ones.
        scoring_pass_bytes: memory budget of one forward pass (passes are planned to fit it); default
            the device's: 256 MB on a CPU, a sixteenth of a GPU's memory.
        search: the step's tuning constants (``SearchConfig``); the defaults are the tuned ones.

    >>> refiner = Refiner(load_model())
    >>> [result] = refiner.refine([RefineRequest(prompt_ids, output_ids, RefineConfig(keywords=("dog",)))])
    >>> result.refined_text, result.objective_before["total"], result.objective_after["total"]
    """

    def __init__(
        self,
        loaded: LoadedModel,
        scoring_chunk_size: int | None = None,
        extra_terms: Sequence[ObjectiveTerm] = (),
        scoring_pass_bytes: int | None = None,
        search: SearchConfig | None = None,
    ) -> None:
        self.tokenizer = loaded.tokenizer
        self.eos_ids = loaded.eos_token_ids
        self.search = search or SearchConfig()
        self.objective = Objective([*default_terms(loaded), *extra_terms])
        self.runner = ModelRunner(
            loaded.model, loaded.tokenizer, self.objective, scoring_chunk_size, pass_bytes=scoring_pass_bytes
        )
        self.cost = CostModel(self.runner.shape, self.objective, self.runner.pass_bytes, self.search)
        embeddings = loaded.model.get_input_embeddings()
        # Gemma multiplies the looked-up rows by sqrt(d) inside its embedding module: the methods work
        # in the table's own scale, so the pass's embeddings are divided by it and gradients multiplied.
        self.embed_scale = float(getattr(embeddings, "embed_scale", 1.0))
        head = loaded.model.get_output_embeddings()
        tied = isinstance(head, PackedLinear) and head.weight is embeddings.weight and head.bias is None
        # The methods' (m, V) gains multiply by the embedding table; a tied head's packed copy of it
        # does that 3-6x faster on a CPU than a plain matmul (Gemma: 29 against 180 ms at 9 rows), and
        # its bfloat16 copy faster again: the gains only propose edits.
        product = None
        if tied:
            product = head.approximate if self.search.approximate_estimates else head
        self.vocab = Vocabulary(loaded.tokenizer, embeddings.weight.detach(), product)
        self.methods: dict[str, RefinementMethod] = {
            name: method(self.search) for name, method in METHODS.items()
        }

    # -- text <-> ids -------------------------------------------------------------------------
    def _split(self, output_ids: list[int]) -> tuple[list[int], list[int], str]:
        """(body, tail, text): a final EOS becomes the tail; the body is put in canonical tokens."""
        tail = output_ids[-1:] if output_ids and output_ids[-1] in self.eos_ids else []
        text = self.vocab.decode(output_ids[: len(output_ids) - len(tail)])
        return self.tokenizer.encode(text, add_special_tokens=False), tail, text

    def _stops_early(self, body: list[int], stop: tuple[str, ...]) -> bool:
        """Whether a stop sequence ends before the body's last token: generation would have ended there."""
        return bool(stop) and end_at_stop(self.vocab.decode(body[:-1]), stop) is not None

    @staticmethod
    def _shown(text: str, stop: tuple[str, ...]) -> str:
        """The text a client gets: cut after a stop sequence, as generation cuts its own."""
        return end_at_stop(text, stop) or text

    # -- public API -----------------------------------------------------------------------------
    def score(
        self, prompt_ids: list[int], outputs: list[list[int]], config: RefineConfig
    ) -> list[dict[str, float]]:
        """Exact objective ``{"total", <term>: value}`` of each output of one prompt.

        Each output is scored as its text re-tokenised (the way ``refine`` scores), so the score of an
        output equals the ``objective_before`` a refinement of it reports.
        """
        if not outputs:
            return []
        split = [self._split(list(o)) for o in outputs]
        state = self.runner.prompt_state([prompt_ids], [None], self.objective.needs_free_context([config]))
        candidates = Outputs(
            [0] * len(outputs),
            [b + t for b, t, _ in split],
            [config] * len(outputs),
            [x for _, _, x in split],
            [self.vocab.decode(prompt_ids)] * len(outputs),
        )
        scores = self.runner.score(state, candidates)
        return [self._report(scores, i, config) for i in range(len(outputs))]

    def refine(
        self, requests: Sequence[RefineRequest], checkpoint: Checkpoint = no_checkpoint
    ) -> list[RefineResult]:
        """Refine a batch of outputs; one result per request, in order. Synchronous torch work.

        ``checkpoint()`` runs between passes and between the chunks of a pass; whatever it raises
        stops the refinement and propagates (the engine stops work that nobody waits for this way).
        """
        if not requests:
            return []
        tracks = []
        for r in requests:
            body, tail, text = self._split(list(r.output_ids))
            prompt = self.vocab.decode(r.prompt_ids)
            tracks.append(_Track(r.config, prompt, body, tail, text, initial_ids=body + tail))
        clock = dict.fromkeys(("prompt", "gradient", "propose", "lookahead", "scoring"), 0.0)
        with _timed(clock, "prompt"):
            state = self.runner.prompt_state(
                [r.prompt_ids for r in requests],
                [r.prompt_cache for r in requests],
                self.objective.needs_free_context([r.config for r in requests]),
            )
        for step in range(max(t.config.steps for t in tracks)):
            active = [i for i, t in enumerate(tracks) if step < t.config.steps and not t.done]
            if not active:
                break
            checkpoint()
            with _timed(clock, "gradient"):
                inputs, current = self._gradient_step(state, [tracks[i] for i in active], active)
            lookahead = Lookahead(
                self.runner,
                state,
                current,
                self.search.lookahead_tokens,
                checkpoint,
                self.search.lookahead_free_context,
                self.search.approximate_estimates,
            )
            self._score_and_accept(
                state, current, [tracks[i] for i in active], inputs, lookahead, step, clock
            )
        # Time is spent for the batch as a whole; each request reports its share.
        return [self._result(t, clock, len(tracks)) for t in tracks]

    # -- one step -------------------------------------------------------------------------------
    def _gradient_step(
        self, state: PromptState, tracks: list[_Track], rows: list[int]
    ) -> tuple[list[StepInput], CurrentOutputs]:
        """The gradient pass over the tracks' current outputs, and each one's ``StepInput``."""
        outputs = [t.body + t.tail for t in tracks]
        current = Outputs(
            rows, outputs, [t.config for t in tracks], [t.text for t in tracks], [t.prompt for t in tracks]
        )
        result = self.runner.gradient_pass(state, current)
        inputs = []
        for j, t in enumerate(tracks):
            t.total, t.report = result.scores.row(j)[0], self._report(result.scores, j, t.config)
            t.before = t.before or t.report
            m = len(t.body)
            twin = state.twins([rows[j]])[0] if self.objective.needs_free_context([t.config]) else None
            inputs.append(
                StepInput(
                    body=t.body,
                    tail=t.tail,
                    text=t.text,
                    config=t.config,
                    row=rows[j],
                    total=t.total,
                    parts=t.report,
                    distributions=result.current.distributions(rows[j], twin, m + 1),
                    embeds=result.embeds[j, :m] / self.embed_scale,
                    grad=result.grad[j, :m] * self.embed_scale,
                    vocab=self.vocab,
                    objective=self.objective,
                )
            )
        return inputs, result.current

    def _score_batch(
        self,
        state: PromptState,
        current: CurrentOutputs,
        tracks: list[_Track],
        steps: list[StepInput],
        proposals: list[list[Proposal]],
        checkpoint: Checkpoint,
    ) -> list[list[tuple[Proposal, float, dict[str, float]]]]:
        """Score every valid proposal of every request in one batched pass (counted on its track).

        Valid: it round-trips through the tokenizer and every weighted term allows its text."""
        flat = [
            (j, p, text)
            for j, props in enumerate(proposals)
            for p in props
            if self.vocab.round_trips(p.body)
            and not self._stops_early(p.body, steps[j].config.stop)
            and self.objective.allows(steps[j], text := self.vocab.decode(p.body))
        ]
        scored: list[list[tuple[Proposal, float, dict[str, float]]]] = [[] for _ in proposals]
        if not flat:
            return scored
        candidates = Outputs(
            [steps[j].row for j, _, _ in flat],
            [p.body + steps[j].tail for j, p, _ in flat],
            [steps[j].config for j, _, _ in flat],
            [text for _, _, text in flat],
            [tracks[j].prompt for j, _, _ in flat],
        )
        scores = self.runner.score(state, candidates, current, checkpoint)
        for c, (j, p, _) in enumerate(flat):
            total = scores.row(c)[0]
            if math.isfinite(total):  # a candidate with NaN scores is dropped, not kept
                scored[j].append((p, total, self._report(scores, c, steps[j].config)))
            tracks[j].candidates += 1
        return scored

    def _score_and_accept(
        self,
        state: PromptState,
        current: CurrentOutputs,
        tracks: list[_Track],
        steps: list[StepInput],
        lookahead: Lookahead,
        step: int,
        clock: dict[str, float],
    ) -> None:
        """Propose (each method for its requests), score, keep the best if it pays."""
        methods = [self.methods[t.config.method] for t in tracks]
        proposals: list[list[Proposal]] = [[] for _ in tracks]
        with _timed(clock, "propose"):
            for method in dict.fromkeys(methods):  # one call per method, so its lookahead is one pass
                mine = [j for j, m in enumerate(methods) if m is method]
                for j, props in zip(mine, method.propose([steps[j] for j in mine], lookahead)):
                    proposals[j] = props
        clock["propose"] -= lookahead.seconds  # the lookahead's passes are a part of their own
        clock["lookahead"] += lookahead.seconds
        with _timed(clock, "scoring"):
            scored = self._score_batch(state, current, tracks, steps, proposals, lookahead.checkpoint)
        floor = self.search.fluency_floor
        for t, candidates in zip(tracks, scored):
            t.steps += 1
            if floor is not None and "fluency" in t.report:
                lowest = t.report["fluency"] - floor
                candidates = [c for c in candidates if c[2].get("fluency", lowest) >= lowest]
            best = max(candidates, key=lambda x: x[1], default=None)
            if best is None or best[1] <= t.total + self.search.min_gain:
                t.done = True  # nothing better: a further step would see the same gradient
                continue
            self._accept(t, *best, step)

    def _accept(
        self, t: _Track, proposal: Proposal, total: float, report: dict[str, float], step: int
    ) -> None:
        for e in proposal.edits:
            t.edits.append(
                {
                    **e.to_dict(),
                    "old_tokens": list(e.old_tokens),
                    "new_tokens": list(e.new_tokens),
                    "old_text": self.tokenizer.decode(list(e.old_tokens)),
                    "new_text": self.tokenizer.decode(list(e.new_tokens)),
                    "step": step,
                }
            )
        t.body, t.text, t.total, t.report = proposal.body, self.vocab.decode(proposal.body), total, report

    def _result(self, t: _Track, clock: dict[str, float], batch: int) -> RefineResult:
        return RefineResult(
            method=t.config.method,
            initial_ids=t.initial_ids,
            refined_ids=t.body + t.tail,
            initial_text=self._shown(self.vocab.decode(t.initial_ids), t.config.stop),
            refined_text=self._shown(t.text, t.config.stop),
            objective_before=t.before,
            objective_after=t.report,
            edits=t.edits,
            candidates_scored=t.candidates,
            **{f"{part}_seconds": seconds / batch for part, seconds in clock.items()},
            steps=t.steps,
        )

    def _report(self, scores: Scores, i: int, config: RefineConfig) -> dict[str, float]:
        return self.objective.report(*scores.row(i), config)


@contextmanager
def _timed(clock: dict[str, float], kind: str) -> Iterator[None]:
    """Add the seconds the block takes to ``clock[kind]``; a profiler sees the block as ``refine.<kind>``."""
    started = time.perf_counter()
    try:
        with torch.profiler.record_function(f"refine.{kind}"):
            yield
    finally:
        clock[kind] += time.perf_counter() - started
