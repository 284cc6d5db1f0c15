"""Batched autoregressive decoding where every row keeps its own sampling parameters.

One ``BatchGenerator.generate`` call decodes several prompts together: the prompts are left-padded
into one batch, run through the model once (prefill), then one token per row per step is decoded with
a KV cache. Each row has its own temperature / top-k / top-p / repetition penalty (transformers'
logits processors, applied row by row), its own ``torch.Generator`` (so a seeded row samples the same
tokens alone or in any batch), its own token budget and stop sequences. A row that finishes leaves
the batch (its cache entries are dropped), so short requests do not pay for long neighbours.

Example:
    >>> gen = BatchGenerator(load_model())
    >>> outs = gen.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_new_tokens=8),
    ...                                           SamplingParams(do_sample=True, seed=0, stop=("\\n",))])
    >>> outs[0].finish_reason
    'length'
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from refiners.attention_mask import AttentionMasks
from refiners.errors import InvalidRequestError, NumericalError
from refiners.models import LoadedModel, picks_logits, shape_free_attention
from refiners.padding import pad_ids
from refiners.scoring import Checkpoint, PromptState, no_checkpoint

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"
# Only for rows the caller stopped through ``cancelled``; nobody waits for such an output.
FINISH_CANCELLED = "cancelled"

MAX_SEED = 2**63 - 1


@dataclass
class SamplingParams:
    """How one row is decoded.

    Args:
        max_new_tokens: most tokens to generate (the row also stops at EOS or a stop sequence).
        do_sample: sample from the distribution; False decodes greedily (temperature, top_k and top_p
            are then ignored; the repetition penalty still applies, as in transformers).
        temperature: divides the logits before sampling; must be > 0.
        top_k: keep only the k most likely tokens before sampling.
        top_p: keep the smallest set of tokens whose probability reaches top_p (nucleus sampling).
        repetition_penalty: CTRL penalty on tokens already in the prompt or output; 1.0 = none.
        seed: seed of this row's random generator; None = a fresh random seed (reported back).
        stop: strings that end the row as soon as the decoded output contains one.
        min_new_tokens: EOS is never chosen before the row has this many tokens (as transformers'
            ``min_new_tokens``); benchmarks use it to get outputs of an exact length.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        # An empty stop string would match at once; drop it rather than end every row immediately.
        self.stop = tuple(s for s in self.stop if s)
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequestError(
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        if not self.temperature > 0:
            raise InvalidRequestError(
                f"temperature must be > 0, got {self.temperature} (for greedy decoding, set do_sample false)"
            )
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequestError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")

    def logits_processors(self) -> LogitsProcessorList:
        """The transformers processors of this row, in the order ``model.generate`` applies them."""
        processors = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


@dataclass
class GenerationOutput:
    """What one row produced.

    ``token_ids`` are all generated ids, including the final EOS when the row stopped on one and the
    token that completed a stop sequence. ``text`` is decoded without special tokens and, when a stop
    sequence matched, ends right after it (the stop sequence is kept, as in TGI).
    ``logprobs[i]`` is log p(token_ids[i]) under the distribution the token was drawn from (after the
    repetition penalty, temperature, top-k and top-p); None where not known (an output that another
    engine generated, re-tokenised here).
    """

    token_ids: list[int]
    text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence" (| "cancelled")
    logprobs: list[float | None]
    seed: int | None
    prompt_tokens: int
    # The prompt's KV cache and next-token distribution (``generate(keep_prompt_cache=True)``), for
    # ``RefineRequest.prompt_cache``: refinement then does not run the prompt again.
    prompt_cache: PromptState | None = None


def end_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """``text`` up to the earliest end of any stop sequence in it, the sequence kept (as in TGI); None
    when it holds none. A token can complete a stop sequence mid-token: the rest of it is cut."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else None


@dataclass(eq=False)
class _Row:
    """Decoding state of one prompt while it is in the batch."""

    index: int  # position in the caller's lists
    params: SamplingParams
    prompt_len: int
    pad: int  # left-padding columns in front of this row's prompt
    budget: int  # max_new_tokens, capped by the model's context length
    processors: LogitsProcessorList
    generator: torch.Generator | None  # None = greedy
    seed: int | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None  # set when a stop sequence matched (truncated after it)
    prompt_cache: PromptState | None = None


class BatchGenerator:
    """Decodes a batch of prompts, each with its own ``SamplingParams``.

    Args:
        loaded: the model, its tokenizer and device (``refiners.models.LoadedModel``).
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        self.device = loaded.device
        self.eos_token_ids = loaded.eos_token_ids
        self._eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=self.device)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else min(self.eos_token_ids, default=0)
        # Ask only for the last position's logits when the model supports it: the prefill would
        # otherwise build a [B, T, V] tensor of which one column is used.
        self._last_logits_only = {"logits_to_keep": 1} if picks_logits(self.model) else {}
        self.masks = AttentionMasks(self.model)

    @torch.inference_mode()
    @shape_free_attention()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        on_token: Callable[[int, int, float], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        keep_prompt_cache: bool = False,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> list[GenerationOutput]:
        """Generate one output per prompt.

        Args:
            prompts: B lists of prompt token ids (each non-empty, any lengths).
            params: B ``SamplingParams``, one per prompt.
            on_token: called as ``on_token(row, token_id, logprob)`` for each token as it is produced,
                in order (row = index in ``prompts``).
            cancelled: ``cancelled(row)`` is asked after each token; True stops that row (its output
                gets finish_reason "cancelled").
            keep_prompt_cache: return each prompt's KV cache in ``GenerationOutput.prompt_cache``.
            checkpoint: run before every decode step; what it raises propagates (the engine uses it
                to mark progress and to serve small requests during a long generation).

        Returns:
            B ``GenerationOutput``, in the order of ``prompts``.
        """
        if len(prompts) != len(params):
            raise InvalidRequestError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        rows = [self._new_row(i, list(p), sp, width) for i, (p, sp) in enumerate(zip(prompts, params))]
        ids, mask = pad_ids(prompts, self.pad_token_id, left=True, device=self.device)  # [B, T] each
        # Positions count real tokens only, so a left-padded prompt sees the positions it would alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        next_pos = positions[:, -1] + 1  # [B] position of each row's next token
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, rows)  # [B, V]
        if keep_prompt_cache:
            self._keep_prompt_caches(rows, cache, mask, logits)
        active = rows  # rows still decoding; batch row j of every tensor is active[j]

        while True:
            tokens, logprobs = self._choose(logits, ids, active)  # [b], [b]
            ids = torch.cat([ids, tokens[:, None]], dim=-1)  # [b, T + t]
            keep = self._append(active, tokens, logprobs, on_token, cancelled)
            if not keep:
                break
            if len(keep) < len(active):
                # Drop finished rows from every batched tensor and from the KV cache.
                sel = torch.tensor(keep, device=ids.device)
                cache.batch_select_indices(sel)
                ids, mask, tokens, next_pos = ids[sel], mask[sel], tokens[sel], next_pos[sel]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)  # [b, T + t + 1]
            checkpoint()
            logits = self._forward(tokens[:, None], mask, next_pos[:, None], cache, active)
            next_pos = next_pos + 1

        return [self._output(row) for row in rows]

    # -- steps ------------------------------------------------------------------------------------

    @staticmethod
    def _keep_prompt_caches(
        rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """Give each row its prompt's KV cache and next-token distribution, right after the prefill.
        Later steps replace the cache's tensors (concatenation), so these stay the prompt's."""
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        state = PromptState(kv, mask, mask.sum(-1), torch.log_softmax(logits, -1))
        for j, row in enumerate(rows):
            row.prompt_cache = state.row(j)

    def _append(
        self,
        active: list[_Row],
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        on_token: Callable[[int, int, float], None] | None,
        cancelled: Callable[[int], bool] | None,
    ) -> list[int]:
        """Add each active row's new token, report it, and decide whether the row is finished.
        Returns the indices (into ``active``) of the rows that go on."""
        # The one device->host copy per step: the host needs the ids for EOS/stop checks and callbacks.
        for row, tok, lp in zip(active, tokens.tolist(), logprobs.tolist(), strict=True):
            row.token_ids.append(tok)
            row.logprobs.append(lp)
            if on_token is not None:
                on_token(row.index, tok, lp)
            row.finish_reason = self._finish_reason(row, tok)
            if row.finish_reason is None and cancelled is not None and cancelled(row.index):
                row.finish_reason = FINISH_CANCELLED
        return [j for j, row in enumerate(active) if row.finish_reason is None]

    def _new_row(self, index: int, prompt: list[int], params: SamplingParams, width: int) -> _Row:
        if not prompt:
            raise InvalidRequestError(f"prompt {index} is empty: give at least one token")
        room = self.loaded.max_position_embeddings - len(prompt)
        if room < 1:
            raise InvalidRequestError(
                f"prompt {index} has {len(prompt)} tokens, the model's context is "
                f"{self.loaded.max_position_embeddings}: shorten the prompt"
            )
        seed, generator = None, None
        if params.do_sample:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        processors = params.logits_processors()
        return _Row(
            index=index,
            params=params,
            prompt_len=len(prompt),
            pad=width - len(prompt),
            budget=min(params.max_new_tokens, room),
            processors=processors,
            generator=generator,
            seed=seed if params.do_sample else params.seed,
        )

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        rows: list[_Row],
    ) -> torch.Tensor:
        """Run the model on new tokens ids [b, n] (mask [b, past + n]) of ``rows``; return the last
        logits [b, V]. A padded batch's mask is built once here (``AttentionMasks``); without padding
        transformers builds none (plain causal attention)."""
        padded = any(row.pad for row in rows)
        out = self.model(
            input_ids=ids,
            attention_mask=self.masks(mask, ids.shape[1]) if padded else mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **self._last_logits_only,
        )
        return out.logits[:, -1, :].float()

    def _choose(
        self, logits: torch.Tensor, ids: torch.Tensor, rows: list[_Row]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick each row's next token with its own processors and generator.

        Args:
            logits: [b, V] float32 next-token logits.
            ids: [b, T + t] every token so far (left padding included), for the repetition penalty.
        Returns:
            tokens [b] (long) and their log-probabilities [b] under the processed distribution.
        """
        bad = ~torch.isfinite(logits).all(dim=-1)  # [b]
        if bool(bad.any()):
            which = [rows[j].index for j in bad.nonzero()[:, 0].tolist()]
            raise NumericalError(f"the model produced NaN or inf logits for rows {which}")
        # min_new_tokens, before any processor as in transformers (EOS gets no probability at all), for
        # every such row at once: a row with no other processor stays on the batched greedy path.
        short = [j for j, row in enumerate(rows) if len(row.token_ids) < row.params.min_new_tokens]
        if short and self.eos_token_ids:
            logits[torch.tensor(short, device=logits.device)[:, None], self._eos] = float("-inf")
        # Plain greedy rows (no processor, no generator) are decided together: a batch's cost then does
        # not grow by a few small ops and host syncs per row and step. Their logits are finite (above)
        # but for EOS under min_new_tokens.
        logp = logits.log_softmax(dim=-1)  # [b, V]
        tokens = logp.argmax(dim=-1)  # [b]
        logprobs = logp.gather(-1, tokens[:, None])[:, 0]  # [b]
        for j, row in enumerate(rows):
            if row.generator is None and not row.processors:
                continue
            # The penalty sees only this row's real tokens, not the padding, as it would alone.
            scores = row.processors(ids[j : j + 1, row.pad :], logits[j : j + 1])  # [1, V]
            row_logp = scores.log_softmax(dim=-1)  # [1, V]; -inf where top-k/top-p removed a token
            if torch.isnan(row_logp).any() or not torch.isfinite(row_logp).any():
                raise NumericalError("sampling parameters gave a distribution with NaN or no finite value")
            if row.generator is None:
                tok = row_logp.argmax(dim=-1)  # [1]
            else:
                tok = torch.multinomial(row_logp.exp(), 1, generator=row.generator)[:, 0]  # [1]
            tokens[j], logprobs[j] = tok[0], row_logp[0, tok[0]]
        return tokens, logprobs

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if token in self.eos_token_ids:
            return FINISH_EOS
        if row.params.stop:
            text = end_at_stop(
                self.tokenizer.decode(row.token_ids, skip_special_tokens=True), row.params.stop
            )
            if text is not None:
                row.text = text
                return FINISH_STOP
        if len(row.token_ids) >= row.budget:
            return FINISH_LENGTH
        return None

    def _output(self, row: _Row) -> GenerationOutput:
        text = row.text
        if text is None:
            text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        return GenerationOutput(
            token_ids=row.token_ids,
            text=text,
            finish_reason=row.finish_reason or FINISH_LENGTH,
            logprobs=row.logprobs,
            seed=row.seed,
            prompt_tokens=row.prompt_len,
            prompt_cache=row.prompt_cache,
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, for streaming.

    Decoding each token alone breaks characters split over several tokens and SentencePiece's leading
    spaces. As in TGI, each step decodes a short window (a few tokens before the new ones, for
    context) and emits what the new tokens added; a piece ending in an incomplete UTF-8 character
    (U+FFFD) is held back until the next token completes it.

    Example:
        >>> detok = IncrementalDetokenizer(tokenizer)
        >>> "".join(detok.push(t) for t in tokenizer.encode("Hello world"))
        'Hello world'
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this were already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]
