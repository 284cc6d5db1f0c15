"""What a request will cost before any work starts: peak memory and model work, from its shape.

The engine refuses a request whose estimate is over the per-request budget (the HTTP layer answers
422 naming the parameter to lower) and sizes every scoring pass by memory, so the settings bound the
peak. The estimates are upper bounds built from the tensors the passes really allocate (shapes in
``refiners/scoring.py``); ``benchmarks/memory.py`` checks them against measured peaks.

Work is counted in token rows (one token through the model once; a backward pass counts twice more)
and in context rows (one output run after its cached context: each pass copies and attends to the
prompt's and shared prefix's keys, which dominates on long prompts). Generation is counted apart
(``decode_steps``): one decode step costs about the same for 1 row or 8.

Example:
    >>> cost = CostModel.of(model, objective)
    >>> c = cost.estimate(prompt_tokens=900, output_tokens=512, config=RefineConfig(candidates=256))
    >>> c.memory_bytes, c.refine_token_rows, c.largest_driver()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from refiners.config import RefineConfig
from refiners.objective import Objective
from refiners.search import SearchConfig

FLOAT = 4  # scores, log-probabilities and gains are float32 whatever the model's dtype
# Autograd keeps, per token and layer, the inputs of every norm, projection and activation: about
# 16 hidden-size vectors and 4 MLP-size ones (counted from Llama's decoder layer, rounded up).
SAVED_HIDDEN_VECTORS, SAVED_MLP_VECTORS = 16, 4
# (C, L, V) float tensors alive at once at the head: logits, log-softmax and its concatenation, and
# in the gradient pass their gradients.
HEAD_COPIES_SCORING, HEAD_COPIES_GRADIENT = 3, 5
# (m, V) tensors alive at once while a method ranks edits (each reading's change of S, the gradient
# through the embedding matrix, each term's estimate and its temporaries, their sum).
GAIN_COPIES = 8
# Allocator and kernel workspace a refinement adds beyond its tensors: the embedded model's smallest
# scenario in benchmarks/memory.py peaked above its tensor estimate by about this much.
WORKSPACE_BYTES = 128 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that set memory and work.

    Attributes:
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab: the architecture.
        act_bytes: bytes per activation element (the model's dtype).
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    act_bytes: int

    @staticmethod
    def of(model: PreTrainedModel) -> ModelShape:
        c = model.config
        c = getattr(c, "text_config", c)  # multimodal configs nest the language model's
        heads = int(c.num_attention_heads)
        hidden = int(c.hidden_size)
        return ModelShape(
            layers=int(c.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(c, "intermediate_size", 4 * hidden)),
            heads=heads,
            kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(c, "head_dim", None) or hidden // heads),
            vocab=int(model.get_input_embeddings().weight.shape[0]),
            act_bytes=next(model.parameters()).element_size(),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.act_bytes

    def attention_bytes(self, queries: int, keys: int) -> int:
        """Eager attention maps of one row, all layers: the scores, their softmax and the stacked
        copy the prompt-coverage term reads."""
        return 3 * self.layers * self.heads * queries * keys * self.act_bytes

    def pass_row_bytes(self, prompt: int, shared: int, suffix: int, attention: bool) -> int:
        """Peak bytes one row adds to an inference pass over ``suffix`` new tokens after ``prompt``
        cached tokens and ``shared`` tokens of its current output: the gathered cache and its
        concatenation with the new keys, the head's (suffix, V) floats, attention maps if asked."""
        keys = prompt + shared + suffix
        total = 2 * keys * self.kv_bytes_per_token + HEAD_COPIES_SCORING * suffix * self.vocab * FLOAT
        if attention:
            total += self.attention_bytes(suffix, keys)
        return total


@dataclass
class Cost:
    """The estimate of one request.

    Attributes:
        memory_bytes: peak bytes above the loaded model while the request runs alone.
        decode_steps: generation steps (one token for every row at once).
        decode_rows: rows generated together (best_of).
        prefill_token_rows: prompt tokens run through the model (best_of rows each).
        refine_token_rows: token rows of every refinement pass, steps included.
        refine_context_rows: outputs run after a cached context, over every pass.
        context_tokens: the context (prompt and output) each of them reads.
        text_tokens: tokens of candidate texts decoded and encoded again (each candidate is checked
            to round-trip through the tokenizer and decoded for the text terms): Python-side work.
    """

    memory_bytes: int
    decode_steps: int
    decode_rows: int
    prefill_token_rows: int
    refine_token_rows: int
    refine_context_rows: int = 0
    context_tokens: int = 0
    text_tokens: int = 0


@dataclass(frozen=True)
class PassLimits:
    """How ``ModelRunner`` plans its passes on a device when the caller sets nothing.

    On a CPU a pass costs its rows, plus a fixed cost of about 32 token rows (reading every weight
    once): large passes gain nothing, so 64 outputs and 256 MB bound them. On a GPU a pass costs its
    kernel launches whatever its rows (a 1B model runs about a thousand token rows in one pass's
    launch time), so passes are large and few: up to 1024 outputs, a sixteenth of the device's memory
    (5 GB on an 80 GB card), and merging two passes pays up to 512 rows of padding.

    A CPU also runs a scoring pass's head a few token positions at a time, about 32 MB of logits
    each, whose log-sum-exp reads them while they are still in cache: the pass never holds its whole
    (C, L, V) logits (the embedded model's 64-token step scored in 0.82x the time, README).
    Passes are still planned as if it did (``ModelShape.pass_row_bytes``): larger ones gained nothing.

    Attributes:
        outputs: most outputs in one pass.
        bytes: memory budget of one pass.
        overhead_rows: the fixed cost of one pass, in token rows (``plan_passes``).
        head_bytes: the logits the head computes at once in a scoring pass (None: the whole pass).
    """

    outputs: int
    bytes: int
    overhead_rows: float
    head_bytes: int | None = None

    @staticmethod
    def of(device: torch.device) -> PassLimits:
        if device.type == "cuda":
            memory = torch.cuda.get_device_properties(device).total_memory
            return PassLimits(outputs=1024, bytes=memory // 16, overhead_rows=512.0)
        return PassLimits(outputs=64, bytes=256 * 2**20, overhead_rows=32.0, head_bytes=32 * 2**20)


class CostModel:
    """Estimates ``Cost`` from a request's shape for one model and objective.

    Args:
        shape: the model's sizes.
        objective: tells which terms need attention maps or prompt-free rows for a config.
        pass_bytes: the memory budget of one scoring pass (``ModelRunner`` plans passes within it).
    """

    def __init__(
        self, shape: ModelShape, objective: Objective, pass_bytes: int, search: SearchConfig | None = None
    ) -> None:
        self.shape, self.objective, self.pass_bytes = shape, objective, pass_bytes
        self.search = search or SearchConfig()
        # The lookahead computes each edit's tokens and those after it, from its first new token on.
        self.lookahead_suffix = self.search.lookahead_tokens + 1
        # Scored with the candidates: the stacks of 2 .. combined_edits single edits.
        self.stacks = self.search.combined_edits - 1

    @staticmethod
    def of(
        model: PreTrainedModel, objective: Objective, pass_bytes: int, search: SearchConfig | None = None
    ) -> CostModel:
        return CostModel(ModelShape.of(model), objective, pass_bytes, search)

    def estimate(
        self,
        prompt_tokens: int,
        output_tokens: int,
        config: RefineConfig | None,
        best_of: int = 1,
        generate: bool = True,
        keyword_tokens: int = 0,
    ) -> Cost:
        """The cost of generating ``output_tokens`` (unless ``generate`` is False: a given output) for
        a ``prompt_tokens`` prompt, ``best_of`` times, then refining it under ``config`` (None: no
        refinement; with best_of > 1 the candidates are scored once, not refined).

        ``keyword_tokens``: tokens of the longest keyword spelling (the lookahead's window).
        """
        s = self.shape
        p, n = prompt_tokens, output_tokens
        rows = best_of if generate else 0
        # Generation: the KV cache of every row (a step concatenates: old and new alive at once).
        memory = 2 * rows * (p + n) * s.kv_bytes_per_token
        token_rows = context_rows = text_tokens = 0
        if config is not None and best_of > 1:  # ranking: one scoring pass over the candidates
            memory = max(memory, self._scoring_memory(p, n, best_of, config))
            context_rows = best_of * self._copies(config)
            token_rows, text_tokens = context_rows * n, best_of * n
        elif config is not None:
            memory = max(memory, WORKSPACE_BYTES + self._refine_memory(p, n, config, keyword_tokens))
            token_rows, context_rows = self._refine_rows(p, n, config, keyword_tokens)
            text_tokens = config.steps * (self._shortlist(config) + config.candidates + self.stacks) * n
        return Cost(
            memory_bytes=int(memory),
            decode_steps=n if generate else 0,
            decode_rows=rows,
            prefill_token_rows=rows * p,
            refine_token_rows=int(token_rows),
            refine_context_rows=int(context_rows),
            context_tokens=p + n,
            text_tokens=text_tokens,
        )

    def _copies(self, config: RefineConfig) -> int:
        """Rows per output: 2 when a term reads it without the prompt too."""
        return 2 if self.objective.needs_free_context([config]) else 1

    def _refine_rows(self, p: int, n: int, config: RefineConfig, keyword_tokens: int) -> tuple[int, int]:
        """(token rows, context rows) of ``config.steps`` steps: the gradient pass (forward and
        backward), the lookahead (4B edits' short windows), exact scoring (B candidates and their
        stacks, each recomputing from its first edit: n / 2 tokens on average), and the prompt once."""
        b, c = config.candidates, self._copies(config)
        shortlist = self._shortlist(config)
        gradient = 3 * n
        lookahead = shortlist * (keyword_tokens + self.lookahead_suffix)
        scoring = (b + self.stacks) * math.ceil(n / 2)
        tokens = p + config.steps * c * (gradient + lookahead + scoring)
        return tokens, config.steps * c * (1 + shortlist + b + self.stacks)

    def _shortlist(self, config: RefineConfig) -> int:
        """Edits given a lookahead in one step (``SearchConfig.shortlist``)."""
        return self.search.shortlist(config.candidates, len(config.keywords))

    def _scoring_memory(
        self, p: int, n: int, rows: int, config: RefineConfig, suffix: int | None = None
    ) -> int:
        """The largest pass over ``rows`` outputs of ``n`` tokens whose suffixes (the part a pass
        computes) are at most ``suffix`` (default n): as many rows as fit ``pass_bytes``, one at least."""
        suffix = n if suffix is None else min(n, suffix)
        one = self.shape.pass_row_bytes(p, n - suffix, suffix, self.objective.needs_attention([config]))
        fitting = max(1, self.pass_bytes // one)
        return min(rows * self._copies(config), fitting) * one

    def _refine_memory(self, p: int, n: int, config: RefineConfig, keyword_tokens: int) -> int:
        """The larger of the gradient pass (with what a method then derives from it) and a scoring
        pass; the prompt's cache stays alive throughout."""
        s, c = self.shape, self._copies(config)
        attention = self.objective.needs_attention([config])
        saved = n * s.layers * (SAVED_HIDDEN_VECTORS * s.hidden + SAVED_MLP_VECTORS * s.intermediate)
        gradient = c * (
            2 * (p + n) * s.kv_bytes_per_token
            + saved * s.act_bytes
            + HEAD_COPIES_GRADIENT * (n + 1) * s.vocab * FLOAT
            + (s.attention_bytes(n, p + n) if attention else 0)
        )
        gains = GAIN_COPIES * (n + 1) * s.vocab * FLOAT
        # Kept through the step: the current outputs' distributions and cache.
        kept = c * ((n + 1) * s.vocab * FLOAT + n * s.kv_bytes_per_token)
        prompt = c * p * s.kv_bytes_per_token
        b = config.candidates
        scoring = max(
            self._scoring_memory(p, n, b + self.stacks, config),  # the candidates and their stacks
            self._scoring_memory(
                p, n, self._shortlist(config), config, keyword_tokens + self.lookahead_suffix
            ),
        )
        return prompt + max(gradient + gains, kept + scoring)
