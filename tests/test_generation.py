"""BatchGenerator: batching must not change any row's output; every row keeps its own params."""

from __future__ import annotations

import pytest
import torch

from refiners.errors import InvalidRequestError
from refiners.generation import BatchGenerator, IncrementalDetokenizer, SamplingParams
from refiners.models import LoadedModel
from tests.tiny_models import embedded_tokenizer, tiny_gemma3, tiny_gpt2, tiny_llama

PROMPTS = ["Hello there, how are you", "Hi", "A much longer prompt that goes on and on for quite a while"]


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


# gemma3-window4: a sliding window shorter than the texts, where a decode step's mask must come from
# transformers (the padding alone is not enough).
@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3", "gemma3-window4"])
def loaded(request, tokenizer) -> LoadedModel:
    builds = {
        "llama": tiny_llama,
        "gpt2": tiny_gpt2,
        "gemma3": tiny_gemma3,
        "gemma3-window4": lambda t: tiny_gemma3(t, sliding_window=4),
    }
    return builds[request.param](tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


def test_batched_greedy_equals_one_by_one_for_prompts_of_different_lengths(loaded, prompts):
    gen = BatchGenerator(loaded)
    params = SamplingParams(max_new_tokens=12)
    batched = gen.generate(prompts, [params] * len(prompts))
    for prompt, out in zip(prompts, batched, strict=True):
        alone = gen.generate([prompt], [params])[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert out.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert out.finish_reason == "length" and len(out.token_ids) == 12
        assert out.prompt_tokens == len(prompt)


def test_greedy_matches_transformers_generate(loaded, prompts):
    out = BatchGenerator(loaded).generate([prompts[0]], [SamplingParams(max_new_tokens=8)])[0]
    ref = loaded.model.generate(
        torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out.token_ids == ref[0, len(prompts[0]) :].tolist()


def test_seeded_sampling_is_deterministic_and_the_same_alone_and_in_a_batch(loaded, prompts):
    gen = BatchGenerator(loaded)
    mixed = [
        SamplingParams(max_new_tokens=10, do_sample=True, seed=1, temperature=0.7, top_k=50),
        SamplingParams(max_new_tokens=6),
        SamplingParams(max_new_tokens=10, do_sample=True, seed=2, top_p=0.9, repetition_penalty=1.3),
    ]
    batched = gen.generate(prompts, mixed)
    again = gen.generate(prompts, mixed)
    for i, prompt in enumerate(prompts):
        alone = gen.generate([prompt], [mixed[i]])[0]
        assert batched[i].token_ids == again[i].token_ids == alone.token_ids
        assert batched[i].seed == mixed[i].seed
    other_seed = gen.generate([prompts[0]], [SamplingParams(max_new_tokens=10, do_sample=True, seed=99)])[0]
    assert other_seed.token_ids != batched[0].token_ids


def test_sampling_without_a_seed_reports_the_seed_it_used(loaded, prompts):
    gen = BatchGenerator(loaded)
    out = gen.generate([prompts[1]], [SamplingParams(max_new_tokens=8, do_sample=True)])[0]
    assert out.seed is not None
    replay = gen.generate([prompts[1]], [SamplingParams(max_new_tokens=8, do_sample=True, seed=out.seed)])[0]
    assert replay.token_ids == out.token_ids


def test_top_k_one_sampling_is_greedy_and_logprob_is_zero(loaded, prompts):
    gen = BatchGenerator(loaded)
    greedy = gen.generate([prompts[0]], [SamplingParams(max_new_tokens=6)])[0]
    top1 = gen.generate([prompts[0]], [SamplingParams(max_new_tokens=6, do_sample=True, top_k=1, seed=5)])[0]
    assert top1.token_ids == greedy.token_ids
    assert top1.logprobs == pytest.approx([0.0] * 6)


def test_each_row_keeps_its_own_max_new_tokens(loaded, prompts):
    budgets = [3, 9, 1]
    outs = BatchGenerator(loaded).generate(prompts, [SamplingParams(max_new_tokens=n) for n in budgets])
    assert [len(o.token_ids) for o in outs] == budgets
    assert all(o.finish_reason == "length" for o in outs)


def test_stop_sequence_ends_a_row_and_is_kept_in_the_text(loaded, prompts, tokenizer):
    gen = BatchGenerator(loaded)
    full = gen.generate([prompts[0]], [SamplingParams(max_new_tokens=12)])[0]
    # A stop string ending inside token k (the last token whose text is new): the row must stop right
    # after that token.
    for k in reversed(range(len(full.token_ids))):
        before = tokenizer.decode(full.token_ids[:k], skip_special_tokens=True)
        stop = tokenizer.decode(full.token_ids[: k + 1], skip_special_tokens=True)[len(before) :][:2]
        if stop and stop not in before:
            break
    outs = gen.generate(
        prompts[:2],
        [SamplingParams(max_new_tokens=12, stop=(stop, "never-seen")), SamplingParams(max_new_tokens=12)],
    )
    assert outs[0].finish_reason == "stop_sequence"
    assert outs[0].token_ids == full.token_ids[: k + 1]
    assert outs[0].text == before + stop and outs[0].text.endswith(stop)
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 12


def test_eos_ends_a_row_and_is_included_in_token_ids(loaded, prompts):
    gen = BatchGenerator(loaded)
    params = SamplingParams(max_new_tokens=10)
    full = gen.generate(prompts[:2], [params, params])
    # The first token that is new at its position (random tiny models repeat themselves a lot).
    ids = full[0].token_ids
    k = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)
    eos = ids[k]
    saved = loaded.model.generation_config.eos_token_id
    loaded.model.generation_config.eos_token_id = eos
    try:
        outs = BatchGenerator(loaded).generate(prompts[:2], [params, params])
    finally:
        loaded.model.generation_config.eos_token_id = saved
    assert outs[0].finish_reason == "eos_token"
    assert outs[0].token_ids == ids[: k + 1]
    if eos not in full[1].token_ids:  # the neighbour is unaffected
        assert outs[1].token_ids == full[1].token_ids

    # min_new_tokens: that row goes past the EOS to its budget, as transformers' generate does; its
    # neighbour (no minimum) still stops at the EOS. A sampled row gets the same minimum before its
    # own processors.
    loaded.model.generation_config.eos_token_id = eos
    try:
        at_least = SamplingParams(max_new_tokens=10, min_new_tokens=10)
        sampled = SamplingParams(
            max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=2.0, seed=0
        )
        outs = BatchGenerator(loaded).generate([*prompts[:2], prompts[0]], [at_least, params, sampled])
        ids = torch.tensor([prompts[0]])
        expected = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False
        )[0, ids.shape[1] :].tolist()
    finally:
        loaded.model.generation_config.eos_token_id = saved
    for out in (outs[0], outs[2]):
        assert len(out.token_ids) == 10 and out.finish_reason == "length" and eos not in out.token_ids
    assert outs[0].token_ids == expected


def test_on_token_sees_every_token_of_every_row_in_order(loaded, prompts):
    seen: dict[int, list[tuple[int, float]]] = {0: [], 1: [], 2: []}
    params = [SamplingParams(max_new_tokens=n, do_sample=True, seed=n) for n in (4, 7, 2)]
    outs = BatchGenerator(loaded).generate(prompts, params, on_token=lambda r, t, lp: seen[r].append((t, lp)))
    for row, out in enumerate(outs):
        assert [t for t, _ in seen[row]] == out.token_ids
        assert [lp for _, lp in seen[row]] == out.logprobs


def test_cancelled_stops_only_that_row(loaded, prompts):
    counts = [0, 0, 0]

    def on_token(row: int, token: int, logprob: float) -> None:
        counts[row] += 1

    outs = BatchGenerator(loaded).generate(
        prompts,
        [SamplingParams(max_new_tokens=10)] * 3,
        on_token=on_token,
        cancelled=lambda row: row == 1 and counts[1] >= 2,
    )
    assert outs[1].finish_reason == "cancelled" and len(outs[1].token_ids) == 2
    assert len(outs[0].token_ids) == len(outs[2].token_ids) == 10


def test_row_budget_is_capped_by_the_context_length(tokenizer):
    loaded = tiny_llama(tokenizer)
    prompt = list(range(10, 250))  # 240 tokens of a 256-token context
    out = BatchGenerator(loaded).generate([prompt], [SamplingParams(max_new_tokens=100)])[0]
    assert len(out.token_ids) == 16 and out.finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="context"):
        BatchGenerator(loaded).generate([list(range(300))], [SamplingParams()])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
    ],
)
def test_invalid_sampling_params_raise_invalid_request_error(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_empty_prompt_is_rejected(tokenizer):
    with pytest.raises(InvalidRequestError, match="empty"):
        BatchGenerator(tiny_llama(tokenizer)).generate([[]], [SamplingParams()])


def test_incremental_detokenizer_pieces_add_up_to_the_text(tokenizer):
    text = "Héllo wörld — naïve café 🙂, twice:  spaces."
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(t) for t in tokenizer.encode(text)) == text
