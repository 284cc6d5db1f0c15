"""The lookahead: exact estimates of single edits over their own tokens and the few after them.

A first-order estimate sees an edit's own tokens and, through the gradient, a linear guess of its effect
on the rest; the text after an inserted word adapts to it, which that guess misses. The lookahead runs
each edit's tokens and the ``lookahead_tokens`` after them exactly, after the cached prefix they share
with the current output: one batched pass over a few tokens per edit, for every request of the step.
The rest of the text counts as unchanged, so the estimate stays an estimate (exact scoring decides).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from refiners.objective import PROMPTED
from refiners.scoring import Outputs

if TYPE_CHECKING:
    from refiners.methods.base import Proposal, StepInput
    from refiners.scoring import Checkpoint, CurrentOutputs, ModelRunner, PromptState


class Lookahead:
    """A service methods call during a step. Built by the ``Refiner`` once per step.

    Args:
        runner: runs the windows; ``state``, ``current``: the step's prompts and current outputs.
        tokens: tokens after each edit that are scored exactly (``SearchConfig.lookahead_tokens``).
        checkpoint: runs before each pass (may raise to stop the work).
        free_context: also run each window without the prompt, for the terms that read the prompt-free
            reading (``SearchConfig.lookahead_free_context``); False halves the lookahead's work.
        approximate: run the passes' products in the proposal dtype (``SearchConfig.approximate_estimates``).
    """

    def __init__(
        self,
        runner: ModelRunner,
        state: PromptState,
        current: CurrentOutputs,
        tokens: int,
        checkpoint: Checkpoint,
        free_context: bool = True,
        approximate: bool = True,
    ) -> None:
        self.runner, self.state, self.current = runner, state, current
        self.tokens, self.checkpoint, self.free_context = tokens, checkpoint, free_context
        self.approximate = approximate
        self.seconds = 0.0  # spent in calls, for the step's timing

    def __call__(
        self, steps: Sequence[StepInput], shortlists: Sequence[Sequence[Proposal]]
    ) -> list[list[Proposal]]:
        """Each single-edit proposal of ``shortlists[j]`` (edits of ``steps[j]``) with its estimate made
        exact over its window; edits that do not round-trip through the tokenizer are dropped."""
        started = time.perf_counter()
        try:
            with torch.profiler.record_function("refine.lookahead"):
                return self._estimates(steps, shortlists)
        finally:
            self.seconds += time.perf_counter() - started

    def _estimates(
        self, steps: Sequence[StepInput], shortlists: Sequence[Sequence[Proposal]]
    ) -> list[list[Proposal]]:
        flat = [
            (j, p) for j, props in enumerate(shortlists) for p in props if steps[j].vocab.round_trips(p.body)
        ]
        kept: list[list[Proposal]] = [[] for _ in shortlists]
        if not flat:
            return kept
        windows = [self._window(steps[j], p) for j, p in flat]
        outputs = Outputs([steps[j].row for j, _ in flat], windows, [steps[j].config for j, _ in flat])
        passes = self.runner.read_outputs(
            self.state,
            outputs,
            self.current,
            checkpoint=self.checkpoint,
            free_context=self.free_context,
            approximate=self.approximate,
        )
        # Each candidate's log-probability sum over its window, per reading, in one device->host copy:
        # the loop below then runs on host floats (on a GPU, a few small kernels and a sync each).
        starts = torch.tensor([p.edits[0].position for _, p in flat], device=passes.mask.device)
        cols = torch.arange(passes.mask.shape[1], device=starts.device)
        in_window = (cols >= starts[:, None]) & (passes.mask != 0)
        sums = {r: (v * in_window).sum(1).tolist() for r, v in passes.readings().items()}
        for c, (j, p) in enumerate(flat):
            step, (edit,) = steps[j], p.edits
            start, grown = edit.position, len(edit.new_tokens) - len(edit.old_tokens)
            old_end = min(start + len(edit.old_tokens) + self.tokens, step.length)
            # Without its own pass, a reading's change is taken to be the prompted reading's.
            delta = {
                r: torch.tensor(sums.get(r, sums[PROMPTED])[c] - (prefix[old_end] - prefix[start]))
                for r, prefix in step.logprob_prefix_sums.items()
            }
            estimate = float(step.estimate(delta, grown, p.phrase, p.body))
            kept[j].append(replace(p, estimate=estimate))
        return kept

    def _window(self, step: StepInput, proposal: Proposal) -> list[int]:
        (edit,) = proposal.edits
        return (proposal.body + step.tail)[: edit.position + len(edit.new_tokens) + self.tokens]
