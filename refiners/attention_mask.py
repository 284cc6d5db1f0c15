"""Attention masks built once per pass, instead of by transformers in every forward.

Given a 2D padding mask (b, keys) with past keys, transformers builds the 4D mask with a ``vmap``
over every (query, key) pair in each forward: in a profile of a batched refinement step of the random
Llama-1B on an H200, that took more host time than the model's layers. The generator's decode steps
and the refiner's passes all append n new tokens after their past keys, so the mask is causal over
the new tokens and the padding over all keys, which one broadcast builds.

transformers takes a 4D mask as given, for every layer. That is right only when each layer sees every
key: full attention, or a sliding window no shorter than the keys (Gemma 3 past its window gets the
2D mask back, for transformers to apply the window).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


class AttentionMasks:
    """Turns a padding mask into the attention mask of a forward over its last ``queries`` keys.

    Args:
        model: the causal LM the masks are for (its layer types, sliding window and dtype).

    >>> masks = AttentionMasks(model)
    >>> out = model(input_ids=new_ids, attention_mask=masks(mask, new_ids.shape[1]), past_key_values=...)
    """

    def __init__(self, model: PreTrainedModel):
        config = model.config
        kinds = set(getattr(config, "layer_types", None) or ())
        self.usable = kinds <= {"full_attention", "sliding_attention"}
        window = getattr(config, "sliding_window", None) if kinds != {"full_attention"} else None
        self.window = window or None
        self.dtype = model.dtype

    def __call__(self, mask: torch.Tensor, queries: int) -> torch.Tensor:
        """``mask`` (b, keys), 1 for real keys, the last ``queries`` keys being the pass's new tokens:
        an additive (b, 1, queries, keys) mask where every layer sees every key (0 where a query may
        attend, the dtype's minimum elsewhere), else ``mask`` itself for transformers to expand."""
        keys = mask.shape[1]
        if not self.usable or (self.window is not None and keys > self.window):
            return mask
        # Query q is key (keys - queries + q): it sees the real keys up to itself.
        at = torch.arange(keys, device=mask.device)
        causal = at <= at[keys - queries :, None]  # (queries, keys)
        allowed = (mask[:, None, None, :] != 0) & causal  # (b, 1, queries, keys)
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=mask.device)
        return additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
