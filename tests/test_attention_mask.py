"""AttentionMasks: the 4D masks the generator and the refiner build give the model's own results."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from refiners.attention_mask import AttentionMasks
from refiners.models import LoadedModel
from tests.tiny_models import ARCHITECTURES, embedded_tokenizer, tiny_gemma3


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def test_a_query_sees_the_real_keys_up_to_itself(tokenizer) -> None:
    masks = AttentionMasks(ARCHITECTURES["llama"](tokenizer).model)
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # left- and right-padded rows
    seen = masks(padding, queries=2) == 0  # (2, 1, 2, 5): the last two keys are the new tokens
    assert seen.shape == (2, 1, 2, 5)
    assert seen[0, 0].tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    assert seen[1, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, False]]


def test_a_sliding_window_shorter_than_the_keys_gets_the_padding_mask_back(tokenizer) -> None:
    masks = AttentionMasks(tiny_gemma3(tokenizer, sliding_window=4).model)
    padding = torch.ones(2, 5, dtype=torch.long)
    assert masks(padding, 1) is padding
    assert masks(padding[:, :4], 1).shape == (2, 1, 1, 4)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_new_tokens_after_a_padded_cache_read_as_they_do_alone(tokenizer, arch: str) -> None:
    """Two prompts of different lengths (left-padded) then three new tokens each, run with the 4D mask
    after the prompts' cache: each row's logits are those of one plain forward over its own tokens."""
    loaded: LoadedModel = ARCHITECTURES[arch](tokenizer)
    model, masks = loaded.model, AttentionMasks(loaded.model)
    prompts = [tokenizer.encode("A dog runs in the park"), tokenizer.encode("Hi")]
    new = [tokenizer.encode(" and then it"), tokenizer.encode(" there, you")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    padding = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(
            input_ids=ids, attention_mask=masks(padding, width), position_ids=positions, past_key_values=cache
        )
        keys = torch.cat([padding, torch.ones(2, 3, dtype=torch.long)], 1)
        later = positions[:, -1:] + 1 + torch.arange(3)
        out = model(
            input_ids=torch.tensor(new),
            attention_mask=masks(keys, 3),
            position_ids=later,
            past_key_values=cache,
        ).logits
        for row, (prompt, tokens) in enumerate(zip(prompts, new, strict=True)):
            alone = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -3:]
            torch.testing.assert_close(out[row], alone, atol=1e-4, rtol=1e-4)
