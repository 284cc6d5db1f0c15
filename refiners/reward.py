"""A reward model as an objective term: a sequence classifier with one output scores prompt + output.

Any Hugging Face ``AutoModelForSequenceClassification`` with a single output fits: a preference reward
model (``Skywork/Skywork-Reward-V2-Qwen3-0.6B``, ``OpenAssistant/reward-model-deberta-v3-large-v2``)
or a quality classifier, from a local directory (the server never downloads). It is loaded next to
the language model, on the same device, and scores every candidate of a scoring pass in one batched
forward. Its tokenizer is its own, so it is not differentiable in the output's embeddings: it decides
between the candidates the other terms propose, it does not steer them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from refiners.errors import ModelLoadError
from refiners.models import resolve_device, resolve_dtype
from refiners.objective import CandidateBatch, ObjectiveTerm

if TYPE_CHECKING:
    from refiners.config import RefineConfig

# The longest prompt + output the reward model reads, in its tokens (the end is kept: the output).
MAX_REWARD_TOKENS = 2048
# Candidates per reward-model forward: bounds its memory whatever ``refine.candidates`` is.
REWARD_BATCH = 32


class RewardModelTerm(ObjectiveTerm):
    """The reward model's score of (prompt, output): chat-formatted (user: prompt, assistant: output)
    when its tokenizer has a chat template, else encoded as a text pair. Off unless weighted.

    Args:
        model: a sequence classifier with one output (``num_labels == 1``).
        tokenizer: its tokenizer.
        model_id: where it was loaded from (reported by ``/info``).
    """

    name = "reward"
    default_weight = 0.0

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str = ""
    ) -> None:
        if int(getattr(model.config, "num_labels", 0)) != 1:
            raise ModelLoadError(
                f"a reward model needs exactly one output (num_labels = 1), {model_id or 'this model'} has "
                f"{getattr(model.config, 'num_labels', None)}"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.truncation_side = "left"
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers read the last real token
        self.model, self.tokenizer, self.model_id = model.eval().requires_grad_(False), tokenizer, model_id

    def active(self, config: RefineConfig) -> bool:
        return config.weights.get(self.name, self.default_weight) > 0

    @torch.no_grad()
    def score(self, batch: CandidateBatch) -> torch.Tensor:
        values = torch.zeros(len(batch.texts), device=batch.mask.device)
        rows = [c for c, config in enumerate(batch.configs) if self.active(config)]
        if not rows:
            return values
        prompts = [batch.prompts[c] if batch.prompts else "" for c in rows]
        outputs = [batch.texts[c] for c in rows]
        device = next(self.model.parameters()).device
        if self.tokenizer.chat_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": o}], tokenize=False
                )
                for p, o in zip(prompts, outputs)
            ]
            encoded = self.tokenizer(texts, add_special_tokens=False, **self._encoding())
        else:
            encoded = self.tokenizer(prompts, outputs, **self._encoding())
        for start in range(0, len(rows), REWARD_BATCH):
            chunk = {k: v[start : start + REWARD_BATCH].to(device) for k, v in encoded.items()}
            scores = self.model(**chunk).logits[:, 0].float().to(values.device)
            values[rows[start : start + REWARD_BATCH]] = scores
        return values

    @staticmethod
    def _encoding() -> dict:
        return {"padding": True, "truncation": True, "max_length": MAX_REWARD_TOKENS, "return_tensors": "pt"}


def load_reward_model(path: str, device: str = "auto", dtype: str = "auto") -> RewardModelTerm:
    """The ``reward`` term of the sequence classifier at ``path`` (a local directory or a cached hub id)."""
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load reward model {path!r}: {exc}") from exc
    return RewardModelTerm(model.to(dev), tokenizer, model_id=path)
