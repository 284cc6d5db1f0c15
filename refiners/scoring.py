"""Forward passes over [prompt; output]: the prompt once, then outputs against its cached keys/values.

``ModelRunner`` is the only module that calls the model during refinement:
- ``encode_prompts`` runs the (left-padded) prompts once and keeps their KV cache and the
  next-token distribution at the first output position;
- ``gradient_pass`` runs the current outputs with gradients on their input embeddings;
- ``score`` runs any number of candidate outputs in chunks, each reusing its prompt's cache instead of
  recomputing the prompt, and returns exact objective values.

When a term reads the output on its own (``FluencyTerm``), ``prompt_state`` appends one row per
prompt holding only a document-start token: the "free twin" of prompt row r is row r + B, and every
output is run twice in the same passes, once after its prompt and once after its twin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from refiners.config import RefineConfig
from refiners.cost import ModelShape
from refiners.errors import NumericalError
from refiners.objective import CandidateBatch, Objective


@dataclass
class PromptState:
    """Cached prompt computation for B prompts (left-padded to length P).

    Attributes:
        kv: per layer, (keys, values) of shape (B, heads, P, head_dim).
        mask: (B, P) 1 for real prompt tokens.
        lengths: (B,) real prompt lengths (the first output position of each row).
        next_logprobs: (B, V) log p(. | X): the distribution of the first output token.
        free_offset: with free twins (``ModelRunner.prompt_state``), the row of prompt 0's twin.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    lengths: torch.Tensor
    next_logprobs: torch.Tensor
    free_offset: int | None = None

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
        )

    @staticmethod
    def stack(rows: Sequence[PromptState]) -> PromptState:
        """One left-padded batch of single-row states, in new tensors (so states made under
        ``torch.inference_mode``, as generation's are, can take part in a gradient pass)."""
        width = max(r.mask.shape[1] for r in rows)

        def left_pad(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
            shape = list(parts[0].shape)
            shape[0], shape[dim] = len(parts), width
            out = parts[0].new_zeros(shape)
            for b, part in enumerate(parts):
                out[b : b + 1].narrow(dim, width - part.shape[dim], part.shape[dim]).copy_(part)
            return out

        kv = [
            (left_pad([r.kv[layer][0] for r in rows], 2), left_pad([r.kv[layer][1] for r in rows], 2))
            for layer in range(len(rows[0].kv))
        ]
        mask = left_pad([r.mask for r in rows], 1)
        next_logprobs = torch.cat([r.next_logprobs for r in rows]).clone()
        return PromptState(kv, mask, mask.sum(-1), next_logprobs)


@dataclass
class OutputPass:
    """What one forward over C outputs (padded to L) gives.

    Attributes:
        token_logprobs: (C, L) log p(y_i | X, y_<i), 0 at padding.
        logprobs: (C, L + 1, V) log p(. | X, y_<i) for i = 0..L (only with ``full_distributions``).
        attention: (C, L, P) attention of each output position to each prompt position (mean over
            heads and layers), or None.
        kv: per layer, the outputs' own (keys, values) (C, heads, L, head_dim) (with full distributions).
        attention_sum: (C, P) the attention summed over output positions, when the per-position maps
            were not kept (scoring: a (C, L, P) tensor over many candidates would dwarf the pass).
    """

    token_logprobs: torch.Tensor
    logprobs: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    attention_sum: torch.Tensor | None = None

    @property
    def prompt_attention(self) -> torch.Tensor | None:
        """(C, P): for each prompt position, the attention summed over output positions."""
        if self.attention_sum is not None:
            return self.attention_sum
        return None if self.attention is None else self.attention.sum(1)


@dataclass
class CurrentOutputs:
    """The gradient pass over the current outputs, kept so candidates can reuse their shared prefix.

    ``index`` maps a prompt row to its place in the tensors; ``ids`` are the current outputs.
    """

    index: dict[int, int]
    ids: list[list[int]]
    token_logprobs: torch.Tensor  # (B, L)
    logprobs: torch.Tensor  # (B, L + 1, V)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, heads, L, head_dim)
    attention: torch.Tensor | None  # (B, L, P)


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (N, max_len), padded on the right."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, : len(s)] = 1
    return ids, mask


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


class ModelRunner:
    """Runs the model for refinement. Parameters never receive gradients.

    Args:
        chunk_size: most outputs in one scoring pass.
        pass_bytes: memory budget of one scoring pass; passes are planned so that their rows fit it
            (``ModelShape.pass_row_bytes``), one row at least.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: Objective,
        chunk_size: int = 64,
        pass_overhead: float = 32.0,
        pass_bytes: int = 256 * 2**20,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"scoring chunk_size must be >= 1, got {chunk_size}")
        if pass_bytes < 1:
            raise ValueError(f"scoring pass_bytes must be >= 1, got {pass_bytes}")
        self.model, self.tokenizer, self.objective, self.chunk_size = model, tokenizer, objective, chunk_size
        self.shape = ModelShape.of(model)
        self.pass_bytes = pass_bytes
        self.device = next(model.parameters()).device
        # The fixed cost of one scoring pass, in token rows: about 32 for a small model on a CPU.
        self.pass_overhead = pass_overhead
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._free_row: PromptState | None = None

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

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[Sequence[int]]) -> PromptState:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column P - 1
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=self.device)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        next_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return PromptState(kv, mask, mask.sum(-1), next_logprobs)

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

    def _forward(
        self,
        state: PromptState,
        rows: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        attention: bool = False,
        full_distributions: bool = False,
        prefix: CurrentOutputs | None = None,
        starts: torch.Tensor | None = None,
    ) -> OutputPass:
        """Forward C outputs (ids: (C, L), right-padded) after their prompts (``rows``: (C,) indices
        into ``state``).

        With ``prefix`` and ``starts`` (C,), output c shares its first starts[c] tokens with its row's
        current output: their keys/values, log-probabilities and attention are taken from ``prefix``
        and only the suffix from starts[c] on is computed. Suffixes are left-aligned (the shared
        prefixes are right-aligned against them in the cache, masked where shorter), so a pass costs
        its longest suffix, not its longest output.
        """
        count, width = ids.shape
        s = starts if starts is not None else torch.zeros(count, dtype=torch.long, device=self.device)
        kv = [(k[rows], v[rows]) for k, v in state.kv]
        past_mask = [state.mask[rows]]
        shared = int(s.max()) if count else 0
        pre = None
        if prefix is not None:
            pre = torch.tensor([prefix.index[int(r)] for r in rows], device=self.device)
        if shared:
            assert pre is not None and prefix is not None and inputs_embeds is None
            # Column j of the shared part holds prefix token s_c - shared + j (masked when negative).
            src = s[:, None] - shared + torch.arange(shared, device=self.device)
            past_mask.append((src >= 0).long())
            index = src.clamp(min=0)[:, None, :, None]

            def take(cached: torch.Tensor) -> torch.Tensor:
                rows_cache = cached[pre]
                return rows_cache.gather(2, index.expand(-1, rows_cache.shape[1], -1, rows_cache.shape[3]))

            kv = [
                (torch.cat([k, take(pk)], 2), torch.cat([v, take(pv)], 2))
                for (k, v), (pk, pv) in zip(kv, prefix.kv)
            ]
        suffix_lengths = mask.sum(1) - s
        span = max(1, int(suffix_lengths.max()) if count else 1)
        steps = torch.arange(span, device=self.device)
        new_mask = (steps < suffix_lengths[:, None]).long()
        new_ids = ids.gather(1, (s[:, None] + steps).clamp(max=width - 1))
        out = self.model(
            input_ids=None if inputs_embeds is not None else new_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=torch.cat([*past_mask, new_mask], dim=1),
            position_ids=state.lengths[rows, None] + s[:, None] + steps,
            past_key_values=DynamicCache.from_legacy_cache(tuple(kv)),
            use_cache=True,
            output_attentions=attention,
        )
        # The distribution of the first computed token comes from the pass before (the prompt's, or
        # the prefix's: its position 0 is the prompt's); logits at i predict the token at i + 1.
        first = state.next_logprobs[rows] if pre is None else prefix.logprobs[pre, s]
        logits = out.logits.float()
        logprobs = None
        if full_distributions:
            logprobs = torch.cat([first[:, None], torch.log_softmax(logits, -1)], 1)
            new_token_logprobs = logprobs[:, :-1].gather(-1, new_ids[..., None]).squeeze(-1)
        else:  # only the chosen tokens' log-probabilities: no (C, L, V) log-softmax copy
            later = logits[:, :-1].gather(-1, new_ids[:, 1:, None]).squeeze(-1) - logits[:, :-1].logsumexp(-1)
            new_token_logprobs = torch.cat([first.gather(-1, new_ids[:, :1]), later], 1)
        prompt_width = state.mask.shape[1]
        per_position = None
        if attention:
            # (layers, C, heads, span, keys) -> mean over layers and heads, prompt keys only.
            per_position = torch.stack([a[..., :prompt_width].float() for a in out.attentions]).mean((0, 2))
        if shared:
            assert prefix is not None and pre is not None
            new_token_logprobs = _splice(prefix.token_logprobs[pre], new_token_logprobs, s, width)
            if per_position is not None:
                assert prefix.attention is not None
                per_position = _splice(prefix.attention[pre], per_position, s, width)
        token_logprobs = new_token_logprobs[:, :width] * mask
        if per_position is not None:
            per_position = per_position[:, :width] * mask[..., None]
        kv_out = None
        if full_distributions:
            kv_out = [
                (layer.keys[:, :, prompt_width:], layer.values[:, :, prompt_width:])
                for layer in out.past_key_values.layers
            ]
        return OutputPass(token_logprobs, logprobs, per_position, kv_out)

    def _batch(
        self,
        state: PromptState,
        rows: torch.Tensor,
        mask: torch.Tensor,
        outputs: OutputPass,
        texts: list[str],
        configs: list[RefineConfig],
    ) -> CandidateBatch:
        """The batch of C outputs; ``outputs`` holds C rows, or 2C with their free twins after them."""
        count = len(texts)
        twins = outputs.token_logprobs.shape[0] > count
        attention = outputs.prompt_attention
        return CandidateBatch(
            token_logprobs=outputs.token_logprobs[:count],
            mask=mask.to(outputs.token_logprobs.dtype),
            texts=texts,
            configs=configs,
            prompt_attention=attention[:count] if attention is not None else None,
            prompt_mask=state.mask[rows].float() if attention is not None else None,
            free_token_logprobs=outputs.token_logprobs[count:] if twins else None,
        )

    def gradient_pass(
        self,
        state: PromptState,
        rows: list[int],
        outputs: list[list[int]],
        texts: list[str],
        configs: list[RefineConfig],
    ) -> tuple[CurrentOutputs, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One forward + backward over the current outputs, gradients on their input embeddings.

        Returns (the pass, kept for prefix reuse; embeddings (C, L, d); dJ/d embeddings (C, L, d) of
        the differentiable terms, 0 at padding; exact term values {name: (C,)}; exact totals (C,)).
        """
        all_rows = self._context_rows(state, rows, configs)
        row_t = torch.tensor(rows, device=self.device)
        ids, mask = pad_right(outputs, self.pad_id, self.device)
        embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        attention = self.objective.needs_attention(configs)
        copies = len(all_rows) // len(rows)  # each output once per context (prompt, free twin)
        with torch.enable_grad(), self._attention_maps(attention):
            result = self._forward(
                state,
                torch.tensor(all_rows, device=self.device),
                ids.repeat(copies, 1),
                mask.repeat(copies, 1),
                embeds.repeat(copies, 1, 1),
                attention,
                full_distributions=True,
            )
            batch = self._batch(state, row_t, mask, result, texts, configs)
            smooth, _ = self.objective.evaluate(batch, differentiable_only=True)
            (grad,) = torch.autograd.grad(smooth.sum(), embeds)
        with torch.no_grad():
            assert result.logprobs is not None and result.kv is not None
            current = CurrentOutputs(
                index={r: i for i, r in enumerate(all_rows)},
                ids=[list(o) for o in outputs] * copies,
                token_logprobs=result.token_logprobs.detach(),
                logprobs=result.logprobs.detach(),
                kv=[(k.detach(), v.detach()) for k, v in result.kv],
                attention=result.attention.detach() if result.attention is not None else None,
            )
            detached = OutputPass(current.token_logprobs, attention=current.attention)
            total, parts = self.objective.evaluate(self._batch(state, row_t, mask, detached, texts, configs))
        if not torch.isfinite(grad).all() or not torch.isfinite(total).all():
            raise NumericalError("the gradient pass produced NaN or inf")
        return current, embeds.detach(), grad * mask[..., None], parts, total

    @torch.no_grad()
    def token_logprobs(
        self,
        state: PromptState,
        rows: list[int],
        outputs: list[list[int]],
        configs: list[RefineConfig],
        current: CurrentOutputs | None = None,
        attention: bool = False,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> tuple[OutputPass, torch.Tensor]:
        """Token log-probabilities of C outputs, in passes of at most ``chunk_size`` outputs that
        fit ``pass_bytes``; ``checkpoint()`` runs before each pass.

        Returns (the pass over C rows, or 2C with a prompt-free term: the free twins after them;
        the (C, L) output mask). Each output reuses its prompt's KV cache and, given ``current``, the
        cache of the tokens it shares with its row's current output, so only its suffix from the
        first difference is computed. Outputs are grouped by suffix length (``plan_passes``) so
        little of a pass is padding.
        """
        all_rows = self._context_rows(state, rows, configs)
        copies = len(all_rows) // max(1, len(outputs))
        all_outputs = list(outputs) * copies
        starts = [self._shared_prefix(current, r, o) for r, o in zip(all_rows, all_outputs)]
        suffixes = [len(o) - st for o, st in zip(all_outputs, starts)]
        order = sorted(range(len(all_outputs)), key=lambda c: -suffixes[c])
        ids, mask = pad_right(all_outputs, self.pad_id, self.device)
        token_logprobs = torch.zeros(ids.shape, device=self.device)
        attention_sum = torch.zeros((len(all_outputs), state.mask.shape[1]), device=self.device)

        def rows_that_fit(suffix: int) -> int:  # the shared prefix is at most the rest of the output
            row = self.shape.pass_row_bytes(state.mask.shape[1], ids.shape[1] - suffix, suffix, attention)
            return max(1, self.pass_bytes // row)

        plan = plan_passes([suffixes[c] for c in order], self.chunk_size, self.pass_overhead, rows_that_fit)
        with self._attention_maps(attention):
            for first, last in plan:
                checkpoint()
                chunk = torch.tensor(order[first:last], device=self.device)
                width = int(mask[chunk].sum(1).max())
                result = self._forward(
                    state,
                    torch.tensor([all_rows[c] for c in order[first:last]], device=self.device),
                    ids[chunk, :width],
                    mask[chunk, :width],
                    attention=attention,
                    prefix=current,
                    starts=torch.tensor([starts[c] for c in order[first:last]], device=self.device),
                )
                token_logprobs[chunk, :width] = result.token_logprobs.float()
                if result.attention is not None:
                    attention_sum[chunk] = result.attention.float().sum(1)
        passes = OutputPass(token_logprobs, attention_sum=attention_sum if attention else None)
        return passes, mask[: len(outputs)]

    @torch.no_grad()
    def score(
        self,
        state: PromptState,
        rows: list[int],
        outputs: list[list[int]],
        texts: list[str],
        configs: list[RefineConfig],
        current: CurrentOutputs | None = None,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Exact objective of C candidate outputs (``token_logprobs`` says how they are run).

        Returns totals (C,) and the values {name: (C,)} of every term active for some candidate.
        """
        attention = self.objective.needs_attention(configs)
        passes, mask = self.token_logprobs(state, rows, outputs, configs, current, attention, checkpoint)
        # Terms see every candidate at once, so a candidate and its free twin meet in one batch.
        row_t = torch.tensor(rows, device=self.device)
        total, parts = self.objective.evaluate(
            self._batch(state, row_t, mask, passes, list(texts), list(configs))
        )
        return total.float(), {name: value.float() for name, value in parts.items()}

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


def plan_passes(
    suffixes: Sequence[int],
    max_size: int,
    overhead: float,
    rows_that_fit: Callable[[int], int] | None = None,
) -> list[tuple[int, int]]:
    """Split candidates sorted by decreasing suffix length into passes [first, last) of at most
    ``max_size`` (and at most ``rows_that_fit(longest suffix)``: the memory bound), minimising the
    computed token rows (size x longest suffix) plus ``overhead`` rows per pass (the fixed cost of a
    forward: reading every weight once). Exact, by dynamic programming."""
    n = len(suffixes)
    limit = [min(max_size, rows_that_fit(s)) if rows_that_fit else max_size for s in suffixes]
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for last in range(1, n + 1):
        for first in range(max(0, last - max_size), last):
            if last - first > limit[first]:
                continue
            cost = best[first] + (last - first) * suffixes[first] + overhead
            if cost < best[last]:
                best[last], cut[last] = cost, first
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
