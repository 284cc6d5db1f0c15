"""One coordinate step on the embedded SmolLM2 model, for a chat-templated CommonGen-style prompt.

The CPU is slow and shared, so the module refines once (a batch of two requests: with and without
keywords) and every test checks that one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from refiners import RefineConfig, Refiner, RefineRequest, RefineResult
from refiners.keywords import coverage
from refiners.models import LoadedModel
from tests.tiny_models import chat_prompt, output_ids

pytestmark = pytest.mark.integration

PROMPT = "Write one short sentence that uses all of these words: dog, frisbee, park."
KEYWORDS = ("dog", "frisbee", "park")
INITIAL = "A happy dog runs around the park on a sunny day."  # "frisbee" is missing


@dataclass
class Run:
    loaded: LoadedModel
    refiner: Refiner
    requests: list[RefineRequest]
    results: list[RefineResult]


@pytest.fixture(scope="module")
def run(embedded_model: LoadedModel) -> Run:
    tokenizer = embedded_model.tokenizer
    prompt = chat_prompt(tokenizer, PROMPT)
    output = output_ids(tokenizer, INITIAL)
    refiner = Refiner(embedded_model)
    requests = [
        RefineRequest(prompt, output, RefineConfig(method="coordinate", keywords=KEYWORDS)),
        RefineRequest(prompt, output, RefineConfig(method="coordinate")),
    ]
    return Run(embedded_model, refiner, requests, refiner.refine(requests))


def test_prompt_is_chat_templated_and_output_ends_with_eos(run: Run) -> None:
    tokenizer = run.loaded.tokenizer
    prompt_text = tokenizer.decode(run.requests[0].prompt_ids)
    assert "<|im_start|>user" in prompt_text and prompt_text.rstrip().endswith("<|im_start|>assistant")
    assert run.requests[0].output_ids[-1] in run.loaded.eos_token_ids


def test_one_coordinate_step_never_lowers_the_objective(run: Run) -> None:
    tokenizer = run.loaded.tokenizer
    for request, result in zip(run.requests, run.results):
        assert result.objective_after["total"] >= result.objective_before["total"]
        # Re-scored from the returned text, both outputs scored by the same exact pass.
        rebuilt = tokenizer.encode(result.refined_text, add_special_tokens=False) + result.refined_ids[-1:]
        assert rebuilt == result.refined_ids
        initial, refined = run.refiner.score(
            request.prompt_ids, [request.output_ids, rebuilt], request.config
        )
        assert refined["total"] >= initial["total"] - 1e-5
        assert refined["total"] == pytest.approx(result.objective_after["total"], abs=1e-3)
        assert initial["total"] == pytest.approx(result.objective_before["total"], abs=1e-3)


def test_the_missing_keyword_is_added_and_the_objective_rises(run: Run) -> None:
    # A refiner that changed nothing would pass "never lower": this one must add "frisbee".
    result = run.results[0]
    before, after = coverage(KEYWORDS, result.initial_text), coverage(KEYWORDS, result.refined_text)
    assert before == pytest.approx(2 / 3) and after == 1.0, result.refined_text
    assert result.objective_before["keywords"] == 2.0 and result.objective_after["keywords"] == 3.0
    assert result.objective_after["total"] > result.objective_before["total"] + 1.0
    assert result.improved and result.refined_ids != result.initial_ids
    assert any("frisbee" in e["new_text"] for e in result.edits)


def test_result_fields_are_sane(run: Run) -> None:
    tokenizer = run.loaded.tokenizer
    for request, result in zip(run.requests, run.results):
        assert result.method == "coordinate" and result.steps == 1
        assert result.initial_ids == request.output_ids
        assert result.initial_text == INITIAL
        assert result.refined_ids[-1] in run.loaded.eos_token_ids
        assert result.refined_text == tokenizer.decode(result.refined_ids, skip_special_tokens=True)
        terms = {"total", "logprob", "fluency"} | ({"keywords"} if request.config.keywords else set())
        assert set(result.objective_before) == terms and set(result.objective_after) == terms
        assert all(
            math.isfinite(v) for v in (*result.objective_before.values(), *result.objective_after.values())
        )
        assert result.objective_before["logprob"] < 0
        assert 0 < result.candidates_scored <= 2 * request.config.candidates  # proposals + their stacks
        assert result.gradient_seconds > 0 and result.scoring_seconds > 0
        assert (result.edits == []) == (result.refined_ids == result.initial_ids)
        for edit in result.edits:
            assert edit["op"] in ("replace", "insert", "delete")
            assert edit["new_text"] == tokenizer.decode(edit["new_tokens"])
            assert edit["old_text"] == tokenizer.decode(edit["old_tokens"])


def test_a_chat_templated_prompt_sent_as_text_tokenizes_to_the_template_ids(embedded_model) -> None:
    # TGI clients send the templated prompt as `inputs`, which the server encodes with special
    # tokens on: like SmolLM2's own tokenizer, the embedded one must add no second <|im_start|>.
    tokenizer = embedded_model.tokenizer
    messages = [{"role": "user", "content": "Write one short sentence that uses: dog, park."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tokenizer(text, add_special_tokens=True)["input_ids"] == list(ids)
