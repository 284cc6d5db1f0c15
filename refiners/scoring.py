"""Forward passes over [prompt; output]: the prompt once, then outputs against its cached keys/values.

``ModelRunner`` is the only module that calls the model during refinement:
- ``encode_prompts`` runs the (left-padded) prompts once and keeps their KV cache and the
  next-token distribution at the first output position;
- ``gradient_pass`` runs the current outputs with gradients on their input embeddings
  (``GradientPass``);
- ``read_outputs`` runs any number of outputs in chunks, each reusing its prompt's cache and the part
  it shares with its row's current output, and gives their token log-probabilities
  (``OutputReadings``); ``score`` turns those into exact objective values (``Scores``).

When a term reads the output on its own (the FREE reading), ``prompt_state`` appends one row per
prompt holding only a document-start token: the "free twin" of prompt row r is row r + B, and every
output is run twice in the same passes, once after its prompt and once after its twin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from refiners.attention_mask import AttentionMasks
from refiners.cost import FLOAT, ModelShape, PassLimits
from refiners.errors import NumericalError
from refiners.models import picks_logits, shape_free_attention, split_head
from refiners.objective import FREE, PROMPTED, CandidateBatch, Objective
from refiners.packed import approximate_products
from refiners.padding import pad_ids

if TYPE_CHECKING:
    from refiners.config import RefineConfig


@dataclass
class PromptState:
    """Cached prompt computation for B prompts (left-padded to length P).

    Attributes:
        kv: per layer, (keys, values) of shape (B, heads, P, head_dim).
        mask: (B, P) 1 for real prompt tokens.
        lengths: (B,) real prompt lengths (the first output position of each row).
        next_logprobs: (B, V) log p(. | X): the distribution of the first output token.
        free_offset: with free twins (``ModelRunner.prompt_state``), the row of prompt 0's twin.
        stacked: ``kv`` as one (layers, 2, B, heads, P, head_dim) tensor (``stack_layers``), of which
            ``kv`` are views; None where it was not made or the layers differ in shape.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    lengths: torch.Tensor
    next_logprobs: torch.Tensor
    free_offset: int | None = None
    stacked: torch.Tensor | None = None

    def twins(self, rows: Sequence[int]) -> list[int]:
        """The free-twin row of each prompt row."""
        if self.free_offset is None:
            raise ValueError("this prompt state has no free-context rows (see ModelRunner.prompt_state)")
        return [r + self.free_offset for r in rows]

    def row(self, i: int) -> PromptState:
        """Row i alone, without its left padding (views of this state's tensors)."""
        pad = self.mask.shape[1] - int(self.lengths[i])
        return PromptState(
            [(k[i : i + 1, :, pad:], v[i : i + 1, :, pad:]) for k, v in self.kv],
            self.mask[i : i + 1, pad:],
            self.lengths[i : i + 1],
            self.next_logprobs[i : i + 1],
            stacked=None if self.stacked is None else self.stacked[:, :, i : i + 1, :, pad:],
        )

    def rows_kv(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys/values of prompt rows ``rows`` (new tensors): one gather when stacked."""
        if self.stacked is not None:
            return layers_of(self.stacked[:, :, rows])
        return [(k[rows], v[rows]) for k, v in self.kv]

    @staticmethod
    def stack(rows: Sequence[PromptState]) -> PromptState:
        """One left-padded batch of single-row states, in new tensors (so states made under
        ``torch.inference_mode``, as generation's are, can take part in a gradient pass)."""
        width = max(r.mask.shape[1] for r in rows)

        def left_pad(parts: list[torch.Tensor], dim: int, rows_dim: int = 0) -> torch.Tensor:
            shape = list(parts[0].shape)
            shape[rows_dim], shape[dim] = len(parts), width
            out = parts[0].new_zeros(shape)
            for b, part in enumerate(parts):
                out.narrow(rows_dim, b, 1).narrow(dim, width - part.shape[dim], part.shape[dim]).copy_(part)
            return out

        mask = left_pad([r.mask for r in rows], 1)
        next_logprobs = torch.cat([r.next_logprobs for r in rows]).clone()
        # One stacked tensor when every row stacks, over its mask's positions, in one shape but those.
        per_row = [r.stacked if r.stacked is not None else stack_layers(r.kv) for r in rows]
        stackable = [s for s, r in zip(per_row, rows) if s is not None and s.shape[4] == r.mask.shape[1]]
        if len(stackable) == len(rows) and len({s.shape[:4] + s.shape[5:] for s in stackable}) == 1:
            stacked = left_pad(stackable, 4, rows_dim=2)
            return PromptState(layers_of(stacked), mask, mask.sum(-1), next_logprobs, stacked=stacked)
        kv = [
            (left_pad([r.kv[layer][0] for r in rows], 2), left_pad([r.kv[layer][1] for r in rows], 2))
            for layer in range(len(rows[0].kv))
        ]
        return PromptState(kv, mask, mask.sum(-1), next_logprobs)


@dataclass
class Outputs:
    """C outputs to run: output c after prompt row ``rows[c]`` of the state, for the request whose
    config is ``configs[c]``; ``texts`` (the decoded outputs) are needed only to score them, and
    ``prompts`` (the decoded prompts) only by terms that read them."""

    rows: list[int]
    ids: list[list[int]]
    configs: list[RefineConfig]
    texts: list[str] | None = None
    prompts: list[str] | None = None


@dataclass
class OutputReadings:
    """Token log-probabilities of C outputs (padded to L) under each reading the objective needs.

    Attributes:
        token_logprobs: (C, L) log p(y_i | X, y_<i), 0 at padding; (2C, L) with the FREE reading:
            the same outputs after their free twins follow.
        mask: (C, L) 1 for real output tokens.
        attention_sum: rows like ``token_logprobs``, (., P): for each prompt position, the attention
            summed over output positions (mean over heads and layers); None unless asked for.
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    attention_sum: torch.Tensor | None = None

    def readings(self) -> dict[str, torch.Tensor]:
        """{PROMPTED: (C, L)} and, when the pass ran the outputs on their own too, {FREE: (C, L)}."""
        count = self.mask.shape[0]
        out = {PROMPTED: self.token_logprobs[:count]}
        if self.token_logprobs.shape[0] > count:
            out[FREE] = self.token_logprobs[count:]
        return out


@dataclass
class CurrentOutputs:
    """The gradient pass over the current outputs, kept so candidates can reuse their shared prefix.

    ``index`` maps a prompt row (free twins included) to its place in the tensors; ``ids`` are the
    outputs of those places.
    """

    index: dict[int, int]
    ids: list[list[int]]
    token_logprobs: torch.Tensor  # (B, L)
    logprobs: torch.Tensor  # (B, L + 1, V)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, heads, L, head_dim)
    attention: torch.Tensor | None  # (B, L, P)
    stacked: torch.Tensor | None = None  # ``kv`` as one tensor (``stack_layers``), of which kv are views

    def distributions(self, row: int, twin: int | None, length: int) -> dict[str, torch.Tensor]:
        """Per reading, the (length, V) next-token distributions of prompt row ``row``'s output."""
        out = {PROMPTED: self.logprobs[self.index[row], :length]}
        if twin is not None:
            out[FREE] = self.logprobs[self.index[twin], :length]
        return out


@dataclass
class Scores:
    """Exact objective values of C outputs: ``totals`` (C,) and each term's values {name: (C,)}."""

    totals: torch.Tensor
    parts: dict[str, torch.Tensor]

    @cached_property
    def _host(self) -> list[list[float]]:
        """Totals then each part, as host floats: one device->host copy for every row's report."""
        return torch.stack([self.totals.float(), *(v.float() for v in self.parts.values())]).tolist()

    def row(self, i: int) -> tuple[float, dict[str, float]]:
        totals, *parts = self._host
        return totals[i], {name: values[i] for name, values in zip(self.parts, parts)}


@dataclass
class GradientPass:
    """The gradient pass over B current outputs (padded to L).

    Attributes:
        current: the pass, kept for prefix reuse and for the methods' distributions.
        embeds: (B, L, d) the outputs' input embeddings.
        grad: (B, L, d) dJ/d embeds of the differentiable terms, 0 at padding.
        scores: the outputs' exact objective values.
    """

    current: CurrentOutputs
    embeds: torch.Tensor
    grad: torch.Tensor
    scores: Scores


@dataclass
class _Forward:
    """One model forward over C outputs: (C, L) chosen-token log-probabilities, 0 at padding, and
    (C, L, P) attention to the prompt when asked for."""

    token_logprobs: torch.Tensor
    attention: torch.Tensor | None


def document_start_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The context a text is read in "on its own": the token that separates pretraining documents.

    That is ``<|endoftext|>`` where the vocabulary has it (GPT-2, SmolLM, Qwen, GPT-NeoX, ...; chat
    tokenizers often name another BOS, such as ``<|im_start|>``, that opens a chat turn instead), else
    the tokenizer's BOS, else its EOS.
    """
    vocab = tokenizer.get_vocab()
    for token_id in (vocab.get("<|endoftext|>"), tokenizer.bos_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return [token_id]
    raise ValueError("the tokenizer has no document-start token (<|endoftext|>, BOS or EOS)")


# What a caller gives the passes to run between chunks: it may raise to stop the work (a deadline,
# a client that left) or do other work meanwhile (the engine serves small requests there).
Checkpoint = Callable[[], None]


def no_checkpoint() -> None:
    return None


def _prompt_attention(attentions: Sequence[torch.Tensor], prompt_width: int) -> torch.Tensor:
    """(layers x (C, heads, span, keys)) -> (C, span, P): mean over layers and heads, prompt keys only."""
    return torch.stack([a[..., :prompt_width].float() for a in attentions]).mean((0, 2))


class ModelRunner:
    """Runs the model for refinement. Parameters never receive gradients.

    Args:
        chunk_size: most outputs in one pass.
        pass_overhead: the fixed cost of one pass, in token rows; passes are planned to minimise rows
            plus overheads.
        pass_bytes: memory budget of one pass; passes are planned so that their rows fit it
            (``ModelShape.pass_row_bytes``), one row at least.
        Each defaults to the device's (``PassLimits``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: Objective,
        chunk_size: int | None = None,
        pass_overhead: float | None = None,
        pass_bytes: int | None = None,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"scoring chunk_size must be >= 1, got {chunk_size}")
        if pass_bytes is not None and pass_bytes < 1:
            raise ValueError(f"scoring pass_bytes must be >= 1, got {pass_bytes}")
        self.model, self.tokenizer, self.objective = model, tokenizer, objective
        self.shape = ModelShape.of(model)
        self.device = next(model.parameters()).device
        limits = PassLimits.of(self.device)
        self.chunk_size = limits.outputs if chunk_size is None else chunk_size
        self.pass_bytes = limits.bytes if pass_bytes is None else pass_bytes
        self.pass_overhead = limits.overhead_rows if pass_overhead is None else pass_overhead
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._free_row: PromptState | None = None
        self._picks_logits = picks_logits(model)
        # Where the head can run apart from the body, a CPU scoring pass runs it a slice at a time.
        self._head = split_head(model) if limits.head_bytes else None
        self._head_rows = max(1, (limits.head_bytes or 0) // (self.shape.vocab * FLOAT))
        self.masks = AttentionMasks(model)

    @contextmanager
    def _attention_maps(self, wanted: bool) -> Iterator[None]:
        """Switch to eager attention while attention maps are needed (SDPA does not return them)."""
        current = self.model.config._attn_implementation
        if not wanted or current == "eager":
            yield
            return
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(current)

    # -- prompts ------------------------------------------------------------------------------------
    @torch.no_grad()
    @shape_free_attention()
    def encode_prompts(self, prompts: Sequence[Sequence[int]]) -> PromptState:
        ids, mask = pad_ids(prompts, self.pad_id, left=True, device=self.device)  # every prompt ends at P - 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = len({len(p) for p in prompts}) > 1  # unpadded prompts need no mask (plain causal)
        attention_mask = self.masks(mask, ids.shape[1]) if padded else mask
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        stacked = stack_layers(kv)
        next_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        kv = kv if stacked is None else layers_of(stacked)
        return PromptState(kv, mask, mask.sum(-1), next_logprobs, stacked=stacked)

    def prompt_state(
        self, prompts: Sequence[Sequence[int]], caches: Sequence[PromptState | None], free_context: bool
    ) -> PromptState:
        """One state for the prompts: the given caches (e.g. generation's), the others computed in
        one pass, followed by one document-start row per prompt (its free twin) with ``free_context``."""
        missing = [i for i, c in enumerate(caches) if c is None]
        if len(missing) == len(prompts) and not free_context:
            return self.encode_prompts(prompts)
        rows = {i: c for i, c in enumerate(caches) if c is not None}
        if missing:
            encoded = self.encode_prompts([prompts[i] for i in missing])
            rows |= {i: encoded.row(j) for j, i in enumerate(missing)}
        twins = []
        if free_context:
            if self._free_row is None:
                self._free_row = self.encode_prompts([document_start_ids(self.tokenizer)])
            twins = [self._free_row] * len(prompts)
        state = PromptState.stack([rows[i] for i in range(len(prompts))] + twins)
        state.free_offset = len(prompts) if free_context else None
        return state

    def _context_rows(
        self, state: PromptState, rows: list[int], configs: Sequence[RefineConfig]
    ) -> list[int]:
        """The prompt rows to run outputs after: ``rows``, then their free twins when a term needs them."""
        return rows + (state.twins(rows) if self.objective.needs_free_context(configs) else [])

    # -- the gradient pass ----------------------------------------------------------------------------
    @shape_free_attention()
    def gradient_pass(self, state: PromptState, batch: Outputs) -> GradientPass:
        """One forward + backward over the current outputs, gradients on their input embeddings."""
        rows, outputs, configs = batch.rows, batch.ids, batch.configs
        all_rows = self._context_rows(state, rows, configs)
        copies = len(all_rows) // len(rows)  # each output once per reading
        ids, mask = pad_ids(outputs, self.pad_id, device=self.device)
        embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        attention = self.objective.needs_attention(configs)
        row_t = torch.tensor(rows, device=self.device)
        with torch.enable_grad(), self._attention_maps(attention):
            current = self._forward_full(
                state,
                all_rows,
                [list(o) for o in outputs] * copies,
                ids.repeat(copies, 1),
                embeds.repeat(copies, 1, 1),
                mask.repeat(copies, 1),
                attention,
            )
            readings = OutputReadings(current.token_logprobs, mask, _attention_sum(current.attention))
            batch_of = partial(self._batch, state, row_t, outputs=batch, ids=ids)
            smooth, _ = self.objective.evaluate(batch_of(readings, embeds=embeds), True)
            (grad,) = torch.autograd.grad(smooth.sum(), embeds)
        current = _detached(current)
        with torch.no_grad():
            readings = OutputReadings(current.token_logprobs, mask, _attention_sum(current.attention))
            total, parts = self.objective.evaluate(batch_of(readings, embeds=embeds.detach()))
        if not torch.isfinite(grad).all() or not torch.isfinite(total).all():
            raise NumericalError("the gradient pass produced NaN or inf")
        return GradientPass(current, embeds.detach(), grad * mask[..., None], Scores(total, parts))

    def _forward_full(
        self,
        state: PromptState,
        rows: list[int],
        outputs: list[list[int]],
        ids: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        attention: bool,
    ) -> CurrentOutputs:
        """Forward C whole outputs (``ids``: (C, L), right-padded; run as their input embeddings
        (C, L, d), which take the gradient) after prompt rows ``rows``, keeping every position's
        next-token distribution and the outputs' own keys/values."""
        row_t = torch.tensor(rows, device=self.device)
        width, prompt_width = mask.shape[1], state.mask.shape[1]
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=self.masks(torch.cat([state.mask[row_t], mask], dim=1), width),
            position_ids=state.lengths[row_t, None] + torch.arange(width, device=self.device),
            past_key_values=cache_over(state.rows_kv(row_t)),
            use_cache=True,
            output_attentions=attention,
        )
        # Logits at i predict the token at i + 1 (the last one's pick is a placeholder, dropped); the
        # first token's distribution is the prompt's.
        picked = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        later, distributions = _LogSoftmaxPicked.apply(out.logits.float(), picked)
        logprobs = torch.cat([state.next_logprobs[row_t][:, None], distributions], 1)
        first = state.next_logprobs[row_t].gather(-1, ids[:, :1])
        token_logprobs = torch.cat([first, later[:, :-1]], 1) * mask
        per_position = None
        if attention:
            per_position = _prompt_attention(out.attentions, prompt_width) * mask[..., None]
        return CurrentOutputs(
            index={r: i for i, r in enumerate(rows)},
            ids=outputs,
            token_logprobs=token_logprobs,
            logprobs=logprobs,
            kv=[
                (layer.keys[:, :, prompt_width:], layer.values[:, :, prompt_width:])
                for layer in out.past_key_values.layers
            ],
            attention=per_position,
        )

    # -- reading and scoring candidates -----------------------------------------------------------------
    @torch.no_grad()
    @shape_free_attention()
    def read_outputs(
        self,
        state: PromptState,
        outputs: Outputs,
        current: CurrentOutputs | None = None,
        attention: bool = False,
        checkpoint: Checkpoint = no_checkpoint,
        free_context: bool = True,
        approximate: bool = False,
    ) -> OutputReadings:
        """Token log-probabilities of C outputs after prompt rows ``rows``, under every reading the
        configs' weighted terms need (``free_context`` False: the prompted one only), in passes of at
        most ``chunk_size`` outputs that fit ``pass_bytes``; ``checkpoint()`` runs before each pass.
        ``approximate``: the values only rank proposals (the lookahead's), so the products may run in
        bfloat16 (``approximate_products``); every score keeps it False.

        Each output reuses its prompt's KV cache and, given ``current``, the cache of the tokens it
        shares with its row's current output, so only its suffix from the first difference is
        computed. Outputs are grouped by suffix length (``plan_passes``) so little of a pass is padding.
        """
        all_rows = self._context_rows(state, outputs.rows, outputs.configs if free_context else ())
        all_outputs = list(outputs.ids) * (len(all_rows) // max(1, len(outputs.ids)))
        starts = [self._shared_prefix(current, r, o) for r, o in zip(all_rows, all_outputs)]
        suffixes = [len(o) - st for o, st in zip(all_outputs, starts)]
        order = sorted(range(len(all_outputs)), key=lambda c: -suffixes[c])
        ids, mask = pad_ids(all_outputs, self.pad_id, device=self.device)
        token_logprobs = torch.zeros(ids.shape, device=self.device)
        attention_sum = torch.zeros((len(all_outputs), state.mask.shape[1]), device=self.device)

        def rows_that_fit(suffix: int) -> int:  # the shared prefix is at most the rest of the output
            row = self.shape.pass_row_bytes(state.mask.shape[1], ids.shape[1] - suffix, suffix, attention)
            return max(1, self.pass_bytes // row)

        plan = plan_passes([suffixes[c] for c in order], self.chunk_size, self.pass_overhead, rows_that_fit)
        with self._attention_maps(attention), approximate_products() if approximate else nullcontext():
            for first, last in plan:
                checkpoint()
                chunk = order[first:last]
                at = torch.tensor(chunk, device=self.device)
                width = int(mask[at].sum(1).max())
                result = self._forward_suffixes(
                    state,
                    [all_rows[c] for c in chunk],
                    ids[at, :width],
                    mask[at, :width],
                    current,
                    torch.tensor([starts[c] for c in chunk], device=self.device),
                    attention,
                )
                token_logprobs[at, :width] = result.token_logprobs.float()
                if result.attention is not None:
                    attention_sum[at] = result.attention.float().sum(1)
        return OutputReadings(token_logprobs, mask[: len(outputs.ids)], attention_sum if attention else None)

    def _forward_suffixes(
        self,
        state: PromptState,
        rows: list[int],
        ids: torch.Tensor,
        mask: torch.Tensor,
        prefix: CurrentOutputs | None,
        starts: torch.Tensor,
        attention: bool,
    ) -> _Forward:
        """Forward C outputs (ids: (C, L), right-padded) after prompt rows ``rows``, computing only
        output c's suffix from starts[c] on: its first starts[c] tokens are its row's current output's,
        whose keys/values, log-probabilities and attention come from ``prefix``. Suffixes are
        left-aligned (the shared prefixes right-aligned against them in the cache, masked where
        shorter), so a pass costs its longest suffix, not its longest output."""
        row_t = torch.tensor(rows, device=self.device)
        width = ids.shape[1]
        pre = None if prefix is None else torch.tensor([prefix.index[r] for r in rows], device=self.device)
        kv, past_mask = self._past(state, row_t, prefix, pre, starts)
        suffix_lengths = mask.sum(1) - starts
        steps = torch.arange(max(1, int(suffix_lengths.max()) if len(rows) else 1), device=self.device)
        new_ids = ids.gather(1, (starts[:, None] + steps).clamp(max=width - 1))
        inputs = dict(
            input_ids=new_ids,
            attention_mask=self.masks(
                torch.cat([*past_mask, (steps < suffix_lengths[:, None]).long()], dim=1), len(steps)
            ),
            position_ids=state.lengths[row_t, None] + starts[:, None] + steps,
            past_key_values=cache_over(kv),
            use_cache=True,
            output_attentions=attention,
        )
        # The last position's logits would predict a token past the suffix: the head skips it (a large
        # share of a few-token lookahead window's work with a 262k vocabulary). Only the chosen tokens'
        # log-probabilities are taken: no (C, L, V) log-softmax copy.
        if self._head is not None:
            body, head = self._head
            out = body(**inputs)
            # Only positions inside their own suffix go through the head: shorter suffixes are padded
            # to the pass's longest, and a padded row costs a 262k-wide head as much as a real one.
            inside = steps[1:] < suffix_lengths[:, None]
            later = self._picked_logprobs(head, out.last_hidden_state[:, :-1], new_ids[:, 1:], inside)
        else:
            skip_last = {"logits_to_keep": steps[:-1]} if self._picks_logits else {}
            out = self.model(**inputs, **skip_last)
            logits = out.logits.float() if skip_last else out.logits[:, :-1].float()
            later = logits.gather(-1, new_ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
        # The first computed token's distribution comes from the pass before (the prompt's, or the prefix's).
        first = state.next_logprobs[row_t] if pre is None else prefix.logprobs[pre, starts]
        token_logprobs = torch.cat([first.gather(-1, new_ids[:, :1]), later], 1)
        per_position = _prompt_attention(out.attentions, state.mask.shape[1]) if attention else None
        if prefix is not None and pre is not None and int(starts.max()):
            token_logprobs = _splice(prefix.token_logprobs[pre], token_logprobs, starts, width)
            if per_position is not None:
                assert prefix.attention is not None
                per_position = _splice(prefix.attention[pre], per_position, starts, width)
        if per_position is not None:
            per_position = per_position[:, :width] * mask[..., None]
        return _Forward(token_logprobs[:, :width] * mask, per_position)

    def _picked_logprobs(
        self, head: torch.nn.Module, hidden: torch.Tensor, picked: torch.Tensor, inside: torch.Tensor
    ) -> torch.Tensor:
        """log p(picked) at the positions of ``hidden`` (C, L, d) where ``inside`` (C, L) holds (0
        elsewhere), the head run on ``_head_rows`` positions at a time: the same numbers as one
        (C, L, V) head, without its memory."""
        flat, ids = hidden[inside], picked[inside][:, None]
        values = torch.empty(ids.shape[0], device=hidden.device)
        for i in range(0, ids.shape[0], self._head_rows):
            logits = head(flat[i : i + self._head_rows]).float()
            j = i + logits.shape[0]
            values[i:j] = logits.gather(-1, ids[i:j]).squeeze(-1) - logits.logsumexp(-1)
        return torch.zeros(picked.shape, device=hidden.device).masked_scatter_(inside, values)

    def _past(
        self,
        state: PromptState,
        rows: torch.Tensor,
        prefix: CurrentOutputs | None,
        pre: torch.Tensor | None,
        starts: torch.Tensor,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """The cache each output's suffix attends to: its prompt row's, then (with shared prefixes) the
        prefix's keys/values, right-aligned. Returns (kv per layer, masks of those parts)."""
        shared = int(starts.max()) if len(starts) else 0
        if not shared or prefix is None or pre is None:
            return state.rows_kv(rows), [state.mask[rows]]
        # Column j of the shared part holds prefix token s_c - shared + j (masked when negative).
        src = starts[:, None] - shared + torch.arange(shared, device=self.device)
        masks = [state.mask[rows], (src >= 0).long()]
        if state.stacked is not None and prefix.stacked is not None:
            cached = prefix.stacked[:, :, pre]  # (layers, 2, C, heads, L, head_dim)
            at = src.clamp(min=0)[None, None, :, None, :, None].expand(*cached.shape[:4], -1, cached.shape[5])
            return layers_of(torch.cat([state.stacked[:, :, rows], cached.gather(4, at)], 4)), masks
        index = src.clamp(min=0)[:, None, :, None]

        def take(cached: torch.Tensor) -> torch.Tensor:
            rows_cache = cached[pre]
            return rows_cache.gather(2, index.expand(-1, rows_cache.shape[1], -1, rows_cache.shape[3]))

        kv = [
            (torch.cat([k, take(pk)], 2), torch.cat([v, take(pv)], 2))
            for (k, v), (pk, pv) in zip(state.rows_kv(rows), prefix.kv)
        ]
        return kv, masks

    @torch.no_grad()
    def score(
        self,
        state: PromptState,
        candidates: Outputs,
        current: CurrentOutputs | None = None,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> Scores:
        """Exact objective of C candidate outputs (``read_outputs`` says how they are run), with the
        values of every term active for some candidate."""
        if candidates.texts is None:
            raise ValueError("scoring needs the candidates' texts")
        attention = self.objective.needs_attention(candidates.configs)
        readings = self.read_outputs(state, candidates, current, attention, checkpoint)
        # Terms see every candidate at once, so a candidate and its free twin meet in one batch.
        row_t = torch.tensor(candidates.rows, device=self.device)
        ids, _ = pad_ids(candidates.ids, self.pad_id, device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        total, parts = self.objective.evaluate(self._batch(state, row_t, readings, candidates, ids, embeds))
        return Scores(total.float(), {name: value.float() for name, value in parts.items()})

    @staticmethod
    def _batch(
        state: PromptState,
        rows: torch.Tensor,
        readings: OutputReadings,
        outputs: Outputs,
        ids: torch.Tensor,
        embeds: torch.Tensor,
    ) -> CandidateBatch:
        """The batch of C outputs (``ids``: (C, L), ``embeds``: (C, L, d)) whose readings ``readings``
        holds, for the objective's terms."""
        by_name, count = readings.readings(), len(outputs.ids)
        attention = readings.attention_sum
        return CandidateBatch(
            token_logprobs=by_name[PROMPTED],
            mask=readings.mask.to(readings.token_logprobs.dtype),
            texts=list(outputs.texts or []),
            configs=list(outputs.configs),
            prompt_attention=attention[:count] if attention is not None else None,
            prompt_mask=state.mask[rows].float() if attention is not None else None,
            free_token_logprobs=by_name.get(FREE),
            ids=ids,
            embeds=embeds,
            prompts=list(outputs.prompts or []),
        )

    @staticmethod
    def _shared_prefix(current: CurrentOutputs | None, row: int, output: list[int]) -> int:
        """How many leading tokens ``output`` shares with its row's current output (at least one
        token is always recomputed)."""
        if current is None or row not in current.index:
            return 0
        ref = current.ids[current.index[row]]
        n = 0
        while n < min(len(ref), len(output)) and ref[n] == output[n]:
            n += 1
        return max(0, min(n, len(output) - 1))


class _LogSoftmaxPicked(torch.autograd.Function):
    """log_softmax(logits) over the last dimension, and its entries at ``picked`` (an index per row):
    only those carry a gradient. Its backward is one pass over the (C, L, V) logits, where autograd's
    gather, slice, cat and log-softmax backwards made four, each filling or copying a tensor that size:
    with Gemma's 262k vocabulary they were half of a 64-token gradient pass."""

    @staticmethod
    def forward(ctx, logits, picked):  # type: ignore[override]
        logprobs = torch.log_softmax(logits, -1)
        ctx.save_for_backward(logprobs, picked)
        ctx.mark_non_differentiable(logprobs)
        ctx.set_materialize_grads(False)  # no (C, L, V) zeros for the distributions' gradient
        return logprobs.gather(-1, picked[..., None]).squeeze(-1), logprobs

    @staticmethod
    def backward(ctx, grad_picked, _grad_logprobs):  # type: ignore[override]
        # d log p_k / d logit_v = [v == k] - p_v
        if grad_picked is None:
            return None, None
        logprobs, picked = ctx.saved_tensors
        grad = logprobs.exp().mul_(-grad_picked[..., None])
        grad.scatter_add_(-1, picked[..., None], grad_picked[..., None])
        return grad, None


def _attention_sum(per_position: torch.Tensor | None) -> torch.Tensor | None:
    """(C, L, P) -> (C, P): the attention each prompt position received, summed over output positions."""
    return None if per_position is None else per_position.sum(1)


def _detached(current: CurrentOutputs) -> CurrentOutputs:
    """The pass without its autograd graph: kept for the rest of the step."""
    with torch.no_grad():
        kv = [(k.detach(), v.detach()) for k, v in current.kv]
        stacked = stack_layers(kv)
        return CurrentOutputs(
            index=current.index,
            ids=current.ids,
            token_logprobs=current.token_logprobs.detach(),
            logprobs=current.logprobs.detach(),
            kv=kv if stacked is None else layers_of(stacked),
            attention=current.attention.detach() if current.attention is not None else None,
            stacked=stacked,
        )


def plan_passes(
    suffixes: Sequence[int],
    max_size: int,
    overhead: float,
    rows_that_fit: Callable[[int], int] | None = None,
) -> list[tuple[int, int]]:
    """Split candidates sorted by decreasing suffix length into passes [first, last) of at most
    ``max_size`` (and at most ``rows_that_fit(longest suffix)``: the memory bound), minimising the
    computed token rows (size x longest suffix) plus ``overhead`` rows per pass (the fixed cost of a
    forward: reading every weight once). Exact, by dynamic programming; each pass end weighs its
    possible starts at once (a GPU's passes hold up to a thousand outputs)."""
    n = len(suffixes)
    suffix = np.asarray(suffixes, dtype=np.float64)
    limit = np.array([min(max_size, rows_that_fit(s)) if rows_that_fit else max_size for s in suffixes])
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = [0] * (n + 1)
    for last in range(1, n + 1):
        first = np.arange(max(0, last - max_size), last)
        cost = best[first] + (last - first) * suffix[first] + overhead
        cost[last - first > limit[first]] = np.inf
        at = int(np.argmin(cost))  # the earliest start among equal costs
        best[last], cut[last] = cost[at], int(first[at])
    passes = []
    while n:
        passes.append((cut[n], n))
        n = cut[n]
    return passes[::-1]


def _splice(prefix: torch.Tensor, suffix: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """Per row c, positions < starts[c] from ``prefix`` (C, Lp, ...), the rest from ``suffix``
    (C, span, ...) shifted by starts[c]: the (C, width, ...) values of the whole outputs."""
    cols = torch.arange(width, device=suffix.device)
    rows = torch.arange(suffix.shape[0], device=suffix.device)[:, None]
    from_prefix = prefix[rows, cols.clamp(max=prefix.shape[1] - 1)]
    from_suffix = suffix[rows, (cols - starts[:, None]).clamp(0, suffix.shape[1] - 1)]
    keep = (cols < starts[:, None]).view(*starts.shape, width, *([1] * (suffix.dim() - 2)))
    return torch.where(keep, from_prefix, from_suffix)


def stack_layers(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Every layer's keys and values as one (layers, 2, rows, heads, positions, head_dim) tensor (a
    copy), or None where they differ in shape (sliding-window layers, other value widths). Selecting
    rows, gathering a shared prefix and joining two caches then take one launch each, not one per
    layer and tensor: on a GPU a small model's step costs its launches."""
    shape = kv[0][0].shape
    if any(t.shape != shape for pair in kv for t in pair):
        return None
    return torch.stack([t for pair in kv for t in pair]).unflatten(0, (len(kv), 2))


def layers_of(stacked: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (keys, values) views of a ``stack_layers`` tensor."""
    return [(layer[0], layer[1]) for layer in stacked]


def cache_over(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A ``DynamicCache`` that starts from these keys/values as they are: ``from_legacy_cache`` copies
    each one (a launch per layer and tensor). The model's forward appends by concatenation, into new
    tensors: these are never written."""
    cache = DynamicCache()
    for k, v in kv:  # what DynamicLayer.update's first call sets, without its copy (transformers 4.57)
        layer = DynamicLayer()
        layer.dtype, layer.device, layer.is_initialized = k.dtype, k.device, True
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache
