"""The objective: each term's value, the weighted total, prompt coverage, custom terms, config checks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from refiners import InvalidRequestError, RefineConfig, Refiner, RefineRequest, RewardTerm
from refiners.config import MAX_CANDIDATES, MAX_KEYWORDS, MAX_STEPS
from refiners.errors import RefinerError
from refiners.methods import METHODS
from refiners.models import LoadedModel
from refiners.objective import (
    DEFAULT_WEIGHTS,
    TERMS,
    CandidateBatch,
    KeywordCoverageTerm,
    LengthTerm,
    LogProbTerm,
    Objective,
    ObjectiveTerm,
    PromptCoverageTerm,
    default_terms,
    gnmt_length_normaliser,
)
from refiners.scoring import document_start_ids
from tests.tiny_models import chat_prompt, embedded_tokenizer, output_ids, tiny_llama

PROMPT = "Write one short sentence that uses all of these words: dog, frisbee, park."
OUTPUT = "A dog plays in the park with a ball."


def batch(
    logprobs: list[list[float]], lengths: list[int], texts: list[str] | None = None, **config: object
) -> CandidateBatch:
    """A hand-made CandidateBatch: token log-probs (C, L) with the first ``lengths[c]`` tokens real;
    the prompt-free log-probs are twice the given ones."""
    lp = torch.tensor(logprobs)
    mask = (torch.arange(lp.shape[1])[None] < torch.tensor(lengths)[:, None]).float()
    texts = texts or [""] * len(lengths)
    configs = [RefineConfig(**config) for _ in texts]
    return CandidateBatch(lp * mask, mask, texts, configs, free_token_logprobs=2 * lp * mask)


# -- the log-probability term ---------------------------------------------------------------------


def test_gnmt_normaliser_values() -> None:
    n = torch.tensor([1.0, 7.0, 13.0])
    assert gnmt_length_normaliser(n, 1.0).tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert gnmt_length_normaliser(n, 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert gnmt_length_normaliser(torch.tensor(31.0), 0.5).item() == pytest.approx(math.sqrt(6.0))


def test_logprob_term_is_the_sum_divided_by_the_gnmt_normaliser() -> None:
    b = batch([[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0, -3.0, -4.0]], [4, 1])
    # n = 4 -> (9/6)^1 = 1.5; n = 1 -> 1.0; padding must not count.
    assert LogProbTerm().score(b).tolist() == pytest.approx([-10.0 / 1.5, -1.0])


def test_logprob_term_follows_length_penalty_alpha() -> None:
    lp = [[-2.0] * 7]
    assert LogProbTerm().score(batch(lp, [7], length_penalty=0.0)).item() == pytest.approx(-14.0)
    assert LogProbTerm().score(batch(lp, [7], length_penalty=1.0)).item() == pytest.approx(-7.0)
    assert LogProbTerm().score(batch(lp, [7], length_penalty=2.0)).item() == pytest.approx(-3.5)


# -- the length term ------------------------------------------------------------------------------


def test_length_term_is_zero_at_target_and_negative_away() -> None:
    b = batch([[0.0] * 10] * 4, [5, 3, 7, 10], texts=["a", "b", "c", "d"], target_length=5)
    values = LengthTerm().score(b).tolist()
    assert values == pytest.approx([0.0, -0.4, -0.4, -1.0])
    assert LengthTerm().active(RefineConfig(target_length=5))
    assert not LengthTerm().active(RefineConfig())


# -- the keyword term -----------------------------------------------------------------------------


def test_keyword_term_counts_keywords_present() -> None:
    texts = ["A dog in the park.", "Dogs catch frisbees in parks.", "Nothing here.", "dogma"]
    b = batch([[0.0]] * 4, [1] * 4, texts=texts, keywords=("dog", "frisbee", "park"))
    assert KeywordCoverageTerm().score(b).tolist() == [2.0, 3.0, 0.0, 0.0]
    assert not KeywordCoverageTerm().active(RefineConfig())


# -- the weighted sum -----------------------------------------------------------------------------


def test_objective_total_is_the_weighted_sum_of_active_terms() -> None:
    config = {"keywords": ("dog", "park"), "target_length": 4, "weights": {"keywords": 3.0, "length": 2.0}}
    b = batch([[-1.0, -1.0, -1.0, -1.0, -1.0]], [5], texts=["A dog."], **config)
    total, parts = Objective(default_terms()).evaluate(b)
    assert set(parts) == {"logprob", "fluency", "length", "keywords"}  # prompt coverage: weight 0, skipped
    logprob, fluency, length, keywords = -5.0 / (10 / 6), -10.0 / (10 / 6), -0.25, 1.0
    assert parts["logprob"].item() == pytest.approx(logprob)
    assert parts["fluency"].item() == pytest.approx(fluency)
    assert parts["length"].item() == pytest.approx(length)
    assert parts["keywords"].item() == pytest.approx(keywords)
    fluency_weight = DEFAULT_WEIGHTS["fluency"]
    assert total.item() == pytest.approx(logprob + fluency_weight * fluency + 2.0 * length + 3.0 * keywords)


def test_objective_report_lists_total_and_only_active_terms() -> None:
    objective = Objective(default_terms())
    parts = {"logprob": -2.0, "length": -0.5, "keywords": 1.0}
    assert objective.report(-1.0, parts, RefineConfig(weights={"fluency": 0})) == {
        "total": -1.0,
        "logprob": -2.0,
    }
    report = objective.report(-1.0, parts, RefineConfig(keywords=("dog",), target_length=3))
    assert report == {"total": -1.0, "logprob": -2.0, "length": -0.5, "keywords": 1.0}
    assert objective.report(-1.0, parts | {"fluency": -3.0}, RefineConfig())["fluency"] == -3.0


def test_objective_rejects_duplicate_term_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        Objective([LogProbTerm(), LogProbTerm()])


# -- configuration checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"method": "beam"}, ["unknown refine method", "'beam'", "coordinate", "gradient", "hybrid"]),
        ({"steps": 0}, ["steps", f"{MAX_STEPS}", "got 0"]),
        ({"steps": MAX_STEPS + 1}, ["steps", f"got {MAX_STEPS + 1}"]),
        ({"candidates": 0}, ["candidates", "got 0"]),
        ({"candidates": MAX_CANDIDATES + 1}, ["candidates", f"{MAX_CANDIDATES}"]),
        ({"weights": {"logprob": -1.0}}, ["weight", "'logprob'", ">= 0"]),
        ({"weights": {"keywords": -0.1}}, ["'keywords'"]),
        ({"length_penalty": -0.5}, ["length_penalty"]),
        ({"target_length": 0}, ["target_length"]),
        ({"step_size": 0.0}, ["step_size"]),
        ({"keywords": tuple(f"w{i}" for i in range(MAX_KEYWORDS + 1))}, ["keywords", f"{MAX_KEYWORDS}"]),
    ],
)
def test_invalid_config_raises_invalid_request_with_clear_message(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        RefineConfig(**kwargs)
    assert isinstance(info.value, RefinerError)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": {"logprob": float("nan")}},
        {"weights": {"keywords": float("inf")}},
        {"length_penalty": float("nan")},
        {"step_size": float("nan")},
        {"step_size": float("inf")},
    ],
)
def test_non_finite_numbers_are_rejected(kwargs: dict) -> None:
    # NaN passes every `x < 0` / `x <= 0` check; it must not reach the model (it would end in a
    # NumericalError, a server error, instead of a 4xx naming the bad field).
    with pytest.raises(InvalidRequestError):
        RefineConfig(**kwargs)


def test_valid_config_defaults_and_keyword_cleanup() -> None:
    config = RefineConfig(keywords=(" dog ", "", "  ", "park"))
    assert config.keywords == ("dog", "park")
    assert (config.method, config.steps, config.candidates) == ("coordinate", 1, 6)


def test_default_weights_live_on_the_term_classes() -> None:
    assert DEFAULT_WEIGHTS == {
        "logprob": 1.0,
        "fluency": 0.75,
        "length": 1.0,
        "keywords": 3.0,
        "avoid": 3.0,
        "reference": 32.0,
        "prompt_coverage": 0.0,
    }
    assert DEFAULT_WEIGHTS == {name: term.default_weight for name, term in TERMS.items()}
    custom = RewardTerm("custom", len, default_weight=5.0)
    objective = Objective([*default_terms(), custom])
    config = RefineConfig(keywords=("dog",), target_length=4)
    # avoid: no words to avoid, so inactive; reference: needs a model's embeddings, so left out here
    assert [t.name for t in objective.terms][4:] == ["avoid", "prompt_coverage", "custom"]
    assert [objective.weight(t, config) for t in objective.terms] == [1.0, 0.75, 1.0, 3.0, 0.0, 0.0, 5.0]
    overridden = RefineConfig(keywords=("dog",), weights={"custom": 0.0, "keywords": 7.0})
    weights = {t.name: objective.weight(t, overridden) for t in objective.terms}
    assert (weights["custom"], weights["keywords"], weights["length"]) == (0.0, 7.0, 0.0)  # length: no target


# -- on a tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def eager_llama(tokenizer) -> LoadedModel:
    return tiny_llama(tokenizer, seed=1, attn_implementation="eager")


@pytest.fixture(scope="module")
def sdpa_llama(tokenizer) -> LoadedModel:
    return tiny_llama(tokenizer, seed=1, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def ids(tokenizer) -> tuple[list[int], list[int]]:
    return chat_prompt(tokenizer, PROMPT), output_ids(tokenizer, OUTPUT)


def manual_normalised_logprob(loaded: LoadedModel, context: list[int], output: list[int]) -> float:
    """sum_t log p(y_t | context, y_<t) / ((5 + n) / 6), from one plain forward over [context; output]."""
    ids = torch.tensor([context + output])
    with torch.no_grad():
        logprobs = loaded.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    chosen = logprobs[len(context) - 1 :].gather(-1, torch.tensor(output)[:, None]).sum()
    return float(chosen) / ((5 + len(output)) / 6)


def test_fluency_term_is_the_log_probability_of_the_output_read_without_the_prompt(sdpa_llama, ids) -> None:
    prompt, output = ids
    [score] = Refiner(sdpa_llama).score(prompt, [output], RefineConfig())
    free = document_start_ids(sdpa_llama.tokenizer)
    assert free == [sdpa_llama.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert score["logprob"] == pytest.approx(manual_normalised_logprob(sdpa_llama, prompt, output), abs=1e-4)
    assert score["fluency"] == pytest.approx(manual_normalised_logprob(sdpa_llama, free, output), abs=1e-4)
    assert score["total"] == pytest.approx(score["logprob"] + DEFAULT_WEIGHTS["fluency"] * score["fluency"])
    [off] = Refiner(sdpa_llama).score(prompt, [output], RefineConfig(weights={"fluency": 0.0}))
    assert "fluency" not in off and off["total"] == pytest.approx(score["logprob"])


def manual_prompt_coverage(loaded: LoadedModel, prompt: list[int], output: list[int]) -> float:
    """Coverage from one plain eager forward over [prompt; output]: attention of each output position
    to each prompt position, mean over layers and heads, summed over output positions."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_attentions=True)
    p = len(prompt)
    attention = torch.stack(out.attentions).mean((0, 2))[0]  # (T, T)
    per_prompt = attention[p:, :p].sum(0)  # (P,)
    return float(per_prompt.clamp(min=1e-9, max=1.0).log().sum())


def test_prompt_coverage_is_finite_non_positive_and_matches_the_attention(eager_llama, ids) -> None:
    prompt, output = ids
    refiner = Refiner(eager_llama)
    config = RefineConfig(weights={"prompt_coverage": 0.5})
    [score] = refiner.score(prompt, [output], config)
    value = score["prompt_coverage"]
    assert math.isfinite(value) and value <= 0.0
    assert value == pytest.approx(manual_prompt_coverage(eager_llama, prompt, output), abs=1e-3)
    fluency = DEFAULT_WEIGHTS["fluency"] * score["fluency"]
    assert score["total"] == pytest.approx(score["logprob"] + fluency + 0.5 * value, abs=1e-4)


def test_prompt_coverage_switches_an_sdpa_model_to_eager_only_while_needed(
    sdpa_llama, eager_llama, ids
) -> None:
    prompt, output = ids
    config = RefineConfig(weights={"prompt_coverage": 1.0})
    [sdpa] = Refiner(sdpa_llama).score(prompt, [output], config)
    [eager] = Refiner(eager_llama).score(prompt, [output], config)
    assert sdpa["prompt_coverage"] == pytest.approx(eager["prompt_coverage"], abs=1e-3)
    assert sdpa_llama.model.config._attn_implementation == "sdpa"


def test_prompt_coverage_is_computed_only_when_its_weight_is_positive(eager_llama, ids, monkeypatch) -> None:
    prompt, output = ids
    calls = []
    original = PromptCoverageTerm.score

    def spy(self, batch):
        calls.append(batch.prompt_attention is not None)
        return original(self, batch)

    monkeypatch.setattr(PromptCoverageTerm, "score", spy)
    refiner = Refiner(eager_llama)
    [off] = refiner.score(prompt, [output], RefineConfig())
    [zero] = refiner.score(prompt, [output], RefineConfig(weights={"prompt_coverage": 0.0}))
    assert calls == []
    assert "prompt_coverage" not in off and "prompt_coverage" not in zero
    assert off["total"] == pytest.approx(zero["total"])
    [on] = refiner.score(prompt, [output], RefineConfig(weights={"prompt_coverage": 0.1}))
    assert calls and all(calls)
    assert "prompt_coverage" in on


def test_refine_reports_prompt_coverage_before_and_after(eager_llama, ids) -> None:
    prompt, output = ids
    refiner = Refiner(eager_llama)
    config = RefineConfig(candidates=6, weights={"prompt_coverage": 0.2})
    [result] = refiner.refine([RefineRequest(prompt, output, config)])
    for report in (result.objective_before, result.objective_after):
        assert math.isfinite(report["prompt_coverage"]) and report["prompt_coverage"] <= 0.0
    [rescored] = refiner.score(prompt, [result.refined_ids], config)
    assert rescored["prompt_coverage"] == pytest.approx(result.objective_after["prompt_coverage"], abs=1e-3)
    assert rescored["total"] == pytest.approx(result.objective_after["total"], abs=1e-3)


# -- custom terms ---------------------------------------------------------------------------------


class LongWordPenalty(ObjectiveTerm):
    """-(number of words longer than 4 letters): a non-differentiable term over text."""

    name = "long_words"
    default_weight = 0.5

    def score(self, batch: CandidateBatch) -> torch.Tensor:
        counts = [-sum(len(w.strip(".,!?")) > 4 for w in t.split()) for t in batch.texts]
        return torch.tensor(counts, dtype=torch.float32)


def test_custom_term_is_scored_reported_and_weighted(sdpa_llama, ids) -> None:
    prompt, output = ids
    refiner = Refiner(sdpa_llama, extra_terms=[LongWordPenalty()])
    text = sdpa_llama.tokenizer.decode(output, skip_special_tokens=True)
    expected = -sum(len(w.strip(".,!?")) > 4 for w in text.split())
    [default] = refiner.score(prompt, [output], RefineConfig())
    assert default["long_words"] == expected
    fluency = DEFAULT_WEIGHTS["fluency"] * default["fluency"]
    assert default["total"] == pytest.approx(default["logprob"] + fluency + 0.5 * expected, abs=1e-4)
    [heavy] = refiner.score(prompt, [output], RefineConfig(weights={"long_words": 3.0, "fluency": 0.0}))
    assert heavy["total"] == pytest.approx(heavy["logprob"] + 3.0 * expected, abs=1e-4)

    config = RefineConfig(candidates=6, weights={"long_words": 2.0, "fluency": 0.0})
    [result] = refiner.refine([RefineRequest(prompt, output, config)])
    for report, ids_ in (
        (result.objective_before, result.initial_ids),
        (result.objective_after, result.refined_ids),
    ):
        assert "long_words" in report
        [rescored] = refiner.score(prompt, [ids_], config)
        assert rescored["long_words"] == report["long_words"]
        assert report["total"] == pytest.approx(report["logprob"] + 2.0 * report["long_words"], abs=1e-4)
    assert result.objective_after["total"] >= result.objective_before["total"]


def test_reward_term_takes_part_in_acceptance(sdpa_llama, ids) -> None:
    """A large keyword weight makes the step insert the missing keyword, unless a reward vetoes change."""
    prompt, output = ids
    initial_text = sdpa_llama.tokenizer.decode(output, skip_special_tokens=True)
    seen: list[str] = []

    def unchanged(text: str) -> float:
        seen.append(text)
        return 0.0 if text == initial_text else -1e4

    refiner = Refiner(sdpa_llama, extra_terms=[RewardTerm("unchanged", unchanged)])
    weights = {"keywords": 100.0}
    free = RefineConfig(candidates=12, keywords=("frisbee",), weights={**weights, "unchanged": 0.0})
    vetoed = RefineConfig(candidates=12, keywords=("frisbee",), weights=weights)
    changed, kept = refiner.refine(
        [RefineRequest(prompt, output, free), RefineRequest(prompt, output, vetoed)]
    )

    assert "frisbee" in changed.refined_text.lower()
    assert changed.objective_after["unchanged"] == -1e4  # reported even at weight 0
    assert kept.refined_ids == kept.initial_ids and kept.edits == []
    assert kept.objective_after == kept.objective_before
    assert kept.objective_after["unchanged"] == 0.0
    assert kept.candidates_scored > 0
    assert seen and not any("<|" in t for t in seen)  # rewards see decoded text, special tokens skipped


def test_reward_term_needs_a_name_and_a_callable() -> None:
    with pytest.raises(ValueError):
        RewardTerm("", len)
    with pytest.raises(ValueError):
        RewardTerm("x", "not callable")  # type: ignore[arg-type]


def test_custom_term_name_must_not_clash_with_a_built_in(sdpa_llama) -> None:
    with pytest.raises(ValueError, match="unique"):
        Refiner(sdpa_llama, extra_terms=[RewardTerm("keywords", len)])


def test_readme_lists_the_registered_methods_and_the_default_weights() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    method_row = next(line for line in readme if line.startswith("| `refine.method`"))
    assert re.findall(r"`(\w+)`", method_row.split("|")[2]) == list(METHODS)
    weights_row = next(line for line in readme if line.startswith("| `refine.weights`"))
    listed = {name: float(w) for name, w in re.findall(r"`(\w+)` \(([\d.]+)", weights_row)}
    assert listed == DEFAULT_WEIGHTS
