"""Tiny random-weight causal LMs sized to the embedded model's tokenizer, for fast refiner tests.

The tokenizer is the embedded SmolLM2 one (read from the converted cache, no weights loaded), so the
tiny models see real English token ids and a real chat template, while a forward pass costs
milliseconds. Two architectures are built (Llama: rotary positions, GQA; GPT-2: learned absolute
positions, fused QKV) because the refiner must work with any Hugging Face causal LM.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from refiners.models import LoadedModel, model_path, prepare_model  # noqa: E402

HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 256


@lru_cache(maxsize=1)
def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer (EOS = <|im_end|>), loaded once per test session.

    Converts the embedded GGUF into the cache the first time (~40 s), like ``load_model()`` does.
    ``$REFINER_TEST_TOKENIZER`` names a copy of it instead, for a machine without the GGUF (a GPU one).
    """
    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("REFINER_TEST_TOKENIZER") or model_path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.eos_token_id)


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    max_positions: int = MAX_POSITIONS,
    pack_weights: bool = True,
) -> LoadedModel:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with random weights, frozen, on CPU."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=eos_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_id(tokenizer)
    return prepare_model(model, tokenizer, model_id="tiny-random-llama", pack_weights=pack_weights)


def tiny_gpt2(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, attn_implementation: str = "sdpa"
) -> LoadedModel:
    """A 2-layer GPT-2 (n_embd 64, 4 heads) with random weights, frozen, on CPU."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=MAX_POSITIONS,
        bos_token_id=eos_id(tokenizer),
        eos_token_id=eos_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = eos_id(tokenizer)
    return prepare_model(model, tokenizer, model_id="tiny-random-gpt2")


def tiny_gemma3(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, sliding_window: int = MAX_POSITIONS
) -> LoadedModel:
    """A 2-layer Gemma 3 (hidden 64, 4 heads, tied head) with random weights, frozen, on CPU. Its
    embedding module multiplies rows by sqrt(hidden), as Gemma 3 270M's does."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=sliding_window,  # by default, as in Gemma 3 270M (512), longer than the test texts
        eos_token_id=eos_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=eos_id(tokenizer),
    )
    model = Gemma3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id(tokenizer)
    return prepare_model(model, tokenizer, model_id="tiny-random-gemma3")


ARCHITECTURES: dict[str, Callable[..., LoadedModel]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "gemma3": tiny_gemma3,
}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> list[int]:
    """Prompt ids of one user turn with the chat template and the assistant header."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in some versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def output_ids(tokenizer: PreTrainedTokenizerBase, text: str, eos: bool = True) -> list[int]:
    """Canonical ids of ``text`` as an output (they round-trip), with a final EOS when ``eos``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids, text
    return ids + ([eos_id(tokenizer)] if eos else [])
