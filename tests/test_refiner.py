"""The refinement step on tiny random Llama and GPT-2 models: the invariants of issue 2.

Every method, with and without keywords, on prompts and outputs of different lengths: the returned
output never scores lower than the initial one when both are re-scored from the returned text,
no special token is introduced, a final EOS stays last, runs are deterministic, batched equals one
by one, weights never change. Then the edit paths that must actually do something: a heavily
weighted keyword gets inserted, a heavily weighted length target moves the length, two steps go
further than one, and candidates scored with the shared-prefix cache score exactly as without it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, replace

import pytest
import torch

from refiners import (
    Edit,
    ObjectiveTerm,
    RefineConfig,
    Refiner,
    RefineRequest,
    RefineResult,
    SearchConfig,
    apply_edits,
)
from refiners.generation import BatchGenerator, SamplingParams
from refiners.keywords import keyword_present
from refiners.methods.base import Vocabulary
from refiners.models import LoadedModel
from refiners.scoring import Outputs, PromptState, plan_passes, stack_layers
from tests.tiny_models import ARCHITECTURES, chat_prompt, embedded_tokenizer, eos_id, output_ids, tiny_llama

TOL = 1e-4
CANDIDATES = 8

# (user prompt, initial output, ends with EOS, method, keywords): every method with and without
# keywords, prompts and outputs of different lengths, one output cut off without EOS.
CASES = [
    (
        "Write one short sentence that uses all of these words: dog, frisbee, park.",
        "A dog plays in the park with a ball.",
        True,
        "coordinate",
        (),
    ),
    ("Name a colour.", "Blue is my favourite.", True, "coordinate", ("green", "sky")),
    (
        "Describe the weather today in a few words, please, for my trip to the coast next week.",
        "It is sunny and warm, with a light breeze from the sea and a few clouds",
        False,
        "gradient",
        (),
    ),
    ("Say hello.", "Hello there, friend!", True, "gradient", ("world",)),
    ("What do cats like?", "Cats like fish and naps.", True, "hybrid", ()),
    (
        "Write one short sentence that uses all of these words: cat, hat, mat.",
        "The cat sat on the mat.",
        True,
        "hybrid",
        ("hat", "cat"),
    ),
]


@dataclass
class Suite:
    """One architecture's refiner and the results of the shared runs."""

    arch: str
    loaded: LoadedModel
    refiner: Refiner
    requests: list[RefineRequest]
    batched: list[RefineResult]
    batched_again: list[RefineResult]
    singles: list[RefineResult]
    parameters_before: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def suite(request, tokenizer) -> Suite:
    loaded = ARCHITECTURES[request.param](tokenizer)
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    refiner = Refiner(loaded)
    requests = [
        RefineRequest(
            chat_prompt(tokenizer, prompt),
            output_ids(tokenizer, output, eos),
            RefineConfig(method=method, candidates=CANDIDATES, keywords=keywords),
        )
        for prompt, output, eos, method, keywords in CASES
    ]
    batched = refiner.refine(requests)
    batched_again = refiner.refine(requests)
    singles = [refiner.refine([r])[0] for r in requests]
    return Suite(request.param, loaded, refiner, requests, batched, batched_again, singles, before)


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))


def split_eos(ids: list[int], eos: int) -> tuple[list[int], list[int]]:
    return (ids[:-1], ids[-1:]) if ids and ids[-1] == eos else (list(ids), [])


def retokenised(tokenizer, result: RefineResult, eos: int) -> list[int]:
    """The refined output as a client would rebuild it from the returned text."""
    _, tail = split_eos(result.refined_ids, eos)
    return tokenizer.encode(result.refined_text, add_special_tokens=False) + tail


# -- invariants over every method, with and without keywords ------------------------------------------


def test_some_case_actually_changes_the_output(suite) -> None:
    # The invariants below would hold trivially if nothing were ever accepted.
    assert any(r.refined_ids != r.initial_ids for r in suite.batched)
    assert any(r.objective_after["total"] > r.objective_before["total"] for r in suite.batched)


def test_refined_output_never_scores_lower_when_rescored_from_its_text(suite, tokenizer) -> None:
    eos = eos_id(tokenizer)
    for request, result in zip(suite.requests, suite.batched):
        initial, refined = suite.refiner.score(
            request.prompt_ids, [request.output_ids, retokenised(tokenizer, result, eos)], request.config
        )
        assert refined["total"] >= initial["total"] - 1e-5, (request.config.method, result.refined_text)
        # The reported numbers are the numbers of the returned text.
        assert initial["total"] == pytest.approx(result.objective_before["total"], abs=TOL)
        assert refined["total"] == pytest.approx(result.objective_after["total"], abs=TOL)
        assert result.objective_after["total"] >= result.objective_before["total"]


def test_refined_text_round_trips_to_the_refined_ids(suite, tokenizer) -> None:
    eos = eos_id(tokenizer)
    for result in suite.batched:
        body, tail = split_eos(result.refined_ids, eos)
        assert tokenizer.decode(body, skip_special_tokens=True) == result.refined_text
        assert tokenizer.encode(tokenizer.decode(body), add_special_tokens=False) == body
        assert retokenised(tokenizer, result, eos) == result.refined_ids


def test_no_special_token_is_introduced_and_a_final_eos_stays_last(suite, tokenizer) -> None:
    eos, specials = eos_id(tokenizer), special_ids(tokenizer)
    for request, result in zip(suite.requests, suite.batched):
        body, tail = split_eos(result.refined_ids, eos)
        assert not specials & set(body), result.refined_ids
        ended_with_eos = request.output_ids[-1] == eos
        assert tail == ([eos] if ended_with_eos else [])
        assert result.refined_ids.count(eos) == (1 if ended_with_eos else 0)
        for edit in result.edits:
            assert not specials & set(edit["new_tokens"])


def test_refine_is_deterministic(suite) -> None:
    for first, second in zip(suite.batched, suite.batched_again):
        assert second.refined_ids == first.refined_ids
        assert second.edits == first.edits
        assert second.objective_after == first.objective_after
        assert second.objective_before == first.objective_before
        assert second.candidates_scored == first.candidates_scored


def test_batched_refine_matches_one_by_one(suite) -> None:
    for batched, single in zip(suite.batched, suite.singles):
        assert batched.refined_text == single.refined_text
        assert batched.refined_ids == single.refined_ids
        for key in single.objective_after:
            assert batched.objective_before[key] == pytest.approx(single.objective_before[key], abs=TOL)
            assert batched.objective_after[key] == pytest.approx(single.objective_after[key], abs=TOL)


def test_model_parameters_never_change_nor_take_gradients(suite) -> None:
    after = suite.loaded.model.state_dict()
    assert after.keys() == suite.parameters_before.keys()
    for name, value in suite.parameters_before.items():
        assert torch.equal(after[name], value), name
    for name, p in suite.loaded.model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert not suite.loaded.model.training


def test_result_carries_ids_texts_objectives_edits_and_timings(suite, tokenizer) -> None:
    for request, result in zip(suite.requests, suite.batched):
        config = request.config
        assert result.method == config.method
        assert result.initial_ids == request.output_ids  # canonical ids are kept as given
        assert result.initial_text == tokenizer.decode(request.output_ids, skip_special_tokens=True)
        expected_terms = {"total", "logprob", "fluency"} | ({"keywords"} if config.keywords else set())
        assert set(result.objective_before) == expected_terms
        assert set(result.objective_after) == expected_terms
        assert all(math.isfinite(v) for v in result.objective_after.values())
        if config.keywords:
            present = sum(keyword_present(k, result.refined_text) for k in config.keywords)
            assert result.objective_after["keywords"] == present
        assert result.candidates_scored > 0
        assert result.gradient_seconds > 0 and result.scoring_seconds > 0
        parts = ("prompt", "gradient", "propose", "lookahead", "scoring")
        assert result.refine_seconds == pytest.approx(sum(getattr(result, f"{p}_seconds") for p in parts))
        assert result.steps == 1
        assert result.improved == (result.refined_ids != result.initial_ids)
        for edit in result.edits:
            assert {"op", "position", "old_tokens", "new_tokens", "old_text", "new_text", "step"} <= set(edit)
            assert edit["op"] in ("replace", "insert", "delete")
            assert edit["old_text"] == tokenizer.decode(edit["old_tokens"])
            assert edit["new_text"] == tokenizer.decode(edit["new_tokens"])
            assert edit["step"] == 0


def replay(result: RefineResult, eos: int) -> list[int]:
    """Apply the reported edits, step by step, to the initial body."""
    body, tail = split_eos(result.initial_ids, eos)
    for step in sorted({e["step"] for e in result.edits}):
        edits = [
            Edit(e["op"], e["position"], tuple(e["old_tokens"]), tuple(e["new_tokens"]))
            for e in result.edits
            if e["step"] == step
        ]
        body = apply_edits(body, edits)
    return body + tail


def test_reported_edits_turn_the_initial_output_into_the_refined_one(suite, tokenizer) -> None:
    for result in suite.batched:
        assert replay(result, eos_id(tokenizer)) == result.refined_ids
        assert (result.edits == []) == (result.refined_ids == result.initial_ids)


# -- the edit paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["coordinate", "hybrid"])
def test_heavily_weighted_missing_keyword_gets_inserted(suite, tokenizer, method) -> None:
    prompt = chat_prompt(
        tokenizer, "Write one short sentence that uses all of these words: dog, frisbee, park."
    )
    output = output_ids(tokenizer, "A dog plays in the park with a ball.")
    config = RefineConfig(
        method=method, candidates=12, keywords=("dog", "frisbee", "park"), weights={"keywords": 100.0}
    )
    [result] = suite.refiner.refine([RefineRequest(prompt, output, config)])
    assert result.objective_before["keywords"] == 2.0
    assert keyword_present("frisbee", result.refined_text), result.refined_text
    assert result.objective_after["keywords"] == 3.0
    assert any("frisbee" in e["new_text"].lower() for e in result.edits)
    [rescored] = suite.refiner.score(prompt, [retokenised(tokenizer, result, eos_id(tokenizer))], config)
    assert rescored["keywords"] == 3.0
    assert rescored["total"] == pytest.approx(result.objective_after["total"], abs=TOL)


def test_only_the_last_token_may_complete_a_stop_sequence_and_texts_end_after_it(suite, tokenizer) -> None:
    prompt = chat_prompt(
        tokenizer, "Write one short sentence that uses all of these words: dog, frisbee, park."
    )
    keyword = RefineConfig(candidates=12, keywords=("frisbee",), weights={"keywords": 100.0})
    output = output_ids(tokenizer, "A dog plays in the park with a ball.")
    # The stop is the keyword itself: generation would have ended at it, so it may only come last.
    [result] = suite.refiner.refine([RefineRequest(prompt, output, replace(keyword, stop=("frisbee",)))])
    body, _ = split_eos(result.refined_ids, eos_id(tokenizer))
    assert "frisbee" not in tokenizer.decode(body[:-1])
    assert "frisbee" not in result.refined_text or result.refined_text.endswith("frisbee")
    # An output whose last token, "\n\n", completed the stop "\n": the texts end after the first
    # newline, as generation's text does, and the token stays.
    newline = output_ids(tokenizer, "A dog plays in the park.\n\n", eos=False)
    [cut] = suite.refiner.refine([RefineRequest(prompt, newline, replace(keyword, stop=("\n",)))])
    assert cut.initial_text == "A dog plays in the park.\n"
    full = tokenizer.decode(cut.refined_ids, skip_special_tokens=True)
    assert cut.refined_text == (full[: full.index("\n") + 1] if "\n" in full else full)


class ConfidentEnding(ObjectiveTerm):
    """A custom differentiable term: the log-probability of the output's last token (its EOS)."""

    name, default_weight, differentiable = "ending", 0.0, True

    def score(self, batch):
        last = (batch.lengths.long() - 1).clamp(min=0)
        return batch.token_logprobs.gather(1, last[:, None]).squeeze(1)


def test_a_custom_differentiable_term_steers_which_edits_are_proposed_and_kept(
    suite, tokenizer, monkeypatch
) -> None:
    # The term has no estimate of its own: it can reach the proposals only through the gradient
    # pass, which it joins because it is differentiable.
    if suite.loaded.model_id == "tiny-random-gemma3":
        pytest.skip("the random Gemma 3 keeps one winner at both weights; Llama and GPT-2 show the steer")
    refiner = Refiner(suite.loaded, extra_terms=[ConfidentEnding()])
    method = refiner.methods["coordinate"]
    shortlists: dict[float, list[tuple[int, ...]]] = {}
    original = method.shortlist
    prompt, text, eos, _, _ = CASES[0]
    prompt_ids, output = chat_prompt(tokenizer, prompt), output_ids(tokenizer, text, eos)
    results = {}
    for weight in (0.0, 50.0):

        def shortlist(step, weight=weight):
            proposals = original(step)
            shortlists[weight] = [tuple(p.body) for p in proposals]
            return proposals

        monkeypatch.setattr(method, "shortlist", shortlist)
        config = RefineConfig(candidates=CANDIDATES, weights={"ending": weight})
        [results[weight]] = refiner.refine([RefineRequest(prompt_ids, output, config)])
    assert shortlists[0.0] and shortlists[50.0] and shortlists[0.0] != shortlists[50.0]
    steered, plain = results[50.0], results[0.0]
    assert steered.refined_ids != plain.refined_ids
    assert steered.objective_after["ending"] > steered.objective_before["ending"]
    assert steered.objective_after["ending"] > plain.objective_after["ending"]


def test_heavily_weighted_length_target_moves_the_length_towards_it(suite, tokenizer) -> None:
    prompt = chat_prompt(tokenizer, "Say something.")
    long = output_ids(tokenizer, "This is a rather long answer with many words that keep going on.")
    short = output_ids(tokenizer, "Yes.")
    weights = {"length": 100.0}
    shorten = RefineConfig(candidates=16, target_length=3, weights=weights)
    lengthen = RefineConfig(candidates=16, target_length=len(short) + 6, weights=weights)
    down, up = suite.refiner.refine(
        [RefineRequest(prompt, long, shorten), RefineRequest(prompt, short, lengthen)]
    )
    assert 3 <= len(down.refined_ids) < len(long)
    assert down.objective_after["length"] > down.objective_before["length"]
    assert any(e["op"] == "delete" for e in down.edits)
    assert len(short) < len(up.refined_ids) <= len(short) + 6
    assert up.objective_after["length"] > up.objective_before["length"]
    assert any(e["op"] == "insert" for e in up.edits)
    for result in (down, up):
        assert result.refined_ids[-1] == eos_id(tokenizer)


def test_two_steps_continue_from_the_first(suite, tokenizer) -> None:
    # A length target 12 tokens away: one step inserts at most ``combined_edits`` tokens, so the
    # second step has room to go further, and must.
    prompt, short = chat_prompt(tokenizer, "Say something."), output_ids(tokenizer, "Yes.")
    config = RefineConfig(candidates=16, target_length=len(short) + 12, weights={"length": 1000.0})
    [one] = suite.refiner.refine([RefineRequest(prompt, short, config)])
    two_config = dataclasses.replace(config, steps=2)
    [two] = suite.refiner.refine([RefineRequest(prompt, short, two_config)])
    assert one.steps == 1 and two.steps == 2
    assert [e for e in two.edits if e["step"] == 0] == one.edits  # the first step is the one-step run
    assert any(e["step"] == 1 for e in two.edits)
    assert two.objective_after["total"] > one.objective_after["total"] + 1e-3
    assert len(short) < len(one.refined_ids) < len(two.refined_ids) <= len(short) + 12
    assert two.candidates_scored > one.candidates_scored
    assert replay(two, eos_id(tokenizer)) == two.refined_ids
    [rescored] = suite.refiner.score(prompt, [two.refined_ids], two_config)
    assert rescored["total"] == pytest.approx(two.objective_after["total"], abs=TOL)


def test_output_of_only_eos_or_nothing_is_handled(suite, tokenizer) -> None:
    prompt = chat_prompt(tokenizer, "Say nothing.")
    eos = eos_id(tokenizer)
    only_eos, empty = suite.refiner.refine(
        [
            RefineRequest(prompt, [eos], RefineConfig(candidates=4)),
            RefineRequest(prompt, [], RefineConfig(candidates=4)),
        ]
    )
    assert only_eos.refined_ids[-1] == eos and only_eos.refined_ids.count(eos) == 1
    assert eos not in empty.refined_ids
    for result in (only_eos, empty):
        assert result.objective_after["total"] >= result.objective_before["total"]
        assert math.isfinite(result.objective_after["total"])


def test_special_tokens_in_the_initial_body_are_not_kept(suite, tokenizer) -> None:
    prompt = chat_prompt(tokenizer, "Name a colour.")
    eos = eos_id(tokenizer)
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    body = tokenizer.encode("Blue sky", add_special_tokens=False)
    output = body[:1] + [bos] + body[1:] + [eos]
    [result] = suite.refiner.refine([RefineRequest(prompt, output, RefineConfig(candidates=4))])
    refined_body, tail = split_eos(result.refined_ids, eos)
    assert tail == [eos]
    assert not special_ids(tokenizer) & set(refined_body)


# -- scoring with the shared-prefix cache -------------------------------------------------------------


def candidate_outputs(output: list[int], filler: int) -> list[list[int]]:
    """A replacement at every position, a deletion or insertion at every other one, and ``output``."""
    out = [list(output)]
    for k in range(len(output)):
        out.append(output[:k] + [filler] + output[k + 1 :])
        if k % 2 == 0:
            out.append(output[:k] + output[k + 1 :] or [filler])
        else:
            out.append(output[:k] + [filler] + output[k:])
    return out


@pytest.mark.parametrize("prompt_coverage", [0.0, 0.5], ids=["no-attention", "prompt-coverage"])
def test_scores_with_prefix_reuse_equal_scores_without(
    suite, tokenizer, monkeypatch, prompt_coverage
) -> None:
    runner = suite.refiner.runner
    prompts = [chat_prompt(tokenizer, "Name a colour."), chat_prompt(tokenizer, CASES[2][0])]
    outputs = [output_ids(tokenizer, "Blue is nice."), output_ids(tokenizer, "A dog plays in the park.")]
    weights = {"prompt_coverage": prompt_coverage}
    configs = [
        RefineConfig(keywords=("dog",), target_length=6, weights=weights),
        RefineConfig(length_penalty=0.6, weights=weights),
    ]
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    state = runner.prompt_state(prompts, [None, None], free_context=True)
    current = runner.gradient_pass(state, Outputs([0, 1], outputs, configs, texts)).current

    filler = tokenizer.encode(" dog", add_special_tokens=False)[0]
    rows, cands = [], []
    for row, output in enumerate(outputs):
        for cand in candidate_outputs(output, filler):
            rows.append(row)
            cands.append(cand)
    cand_texts = [tokenizer.decode(c, skip_special_tokens=True) for c in cands]
    cand_configs = [configs[r] for r in rows]
    monkeypatch.setattr(runner, "chunk_size", 5)  # several chunks, each starting at a different prefix
    candidates = Outputs(rows, cands, cand_configs, cand_texts)
    reused_scores = runner.score(state, candidates, current)
    full_scores = runner.score(state, candidates, None)
    (reused, reused_parts), (full, full_parts) = ((s.totals, s.parts) for s in (reused_scores, full_scores))
    torch.testing.assert_close(reused, full, atol=TOL, rtol=1e-5)
    objective = suite.refiner.objective
    for c, config in enumerate(cand_configs):
        # Inactive terms are NaN or filler depending on which chunk a candidate landed in: only the
        # terms that apply to the candidate's request are compared (the ones its report shows).
        for term in objective.active_terms(config):
            if objective.weight(term, config) > 0 or not term.needs_attention:
                a, b = float(reused_parts[term.name][c]), float(full_parts[term.name][c])
                assert a == pytest.approx(b, abs=TOL), (term.name, c)
    if prompt_coverage:
        assert torch.isfinite(full_parts["prompt_coverage"]).all()

    # And the same as scoring each prompt on its own through the public API (no left padding).
    for row in (0, 1):
        idx = [i for i, r in enumerate(rows) if r == row]
        alone = suite.refiner.score(prompts[row], [cands[i] for i in idx], configs[row])
        assert [a["total"] for a in alone] == pytest.approx([float(full[i]) for i in idx], abs=TOL)


def two_outputs_and_their_candidates(runner, tokenizer):
    """Two prompts with one output each after their gradient pass, and a candidate at every position
    of each (``candidate_outputs``): (state, current, the outputs' batch, the candidates)."""
    prompts = [chat_prompt(tokenizer, "Name a colour."), chat_prompt(tokenizer, CASES[2][0])]
    outputs = [output_ids(tokenizer, "Blue is nice."), output_ids(tokenizer, "A dog plays in the park.")]
    configs = [RefineConfig(keywords=("dog",)), RefineConfig(length_penalty=0.6)]
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    state = runner.prompt_state(prompts, [None, None], free_context=True)
    batch = Outputs([0, 1], outputs, configs, texts)
    current = runner.gradient_pass(state, batch).current
    filler = tokenizer.encode(" dog", add_special_tokens=False)[0]
    rows = [r for r, o in enumerate(outputs) for _ in candidate_outputs(o, filler)]
    cands = [c for o in outputs for c in candidate_outputs(o, filler)]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in cands]
    return state, current, batch, Outputs(rows, cands, [configs[r] for r in rows], texts)


def test_caches_stacked_across_layers_score_as_caches_kept_per_layer(suite, tokenizer, monkeypatch) -> None:
    # Prompt and current-output caches are one tensor across layers where the layers agree in shape
    # (one launch to pick rows or gather a prefix); the per-layer path stays for models whose layers
    # differ. Both must give the same numbers, with and without a shared prefix.
    runner = suite.refiner.runner
    state, current, batch, candidates = two_outputs_and_their_candidates(runner, tokenizer)
    assert state.stacked is not None and current.stacked is not None
    per_layer_state, per_layer_current = replace(state, stacked=None), replace(current, stacked=None)
    monkeypatch.setattr(runner, "chunk_size", 5)
    for prefix, per_layer_prefix in ((current, per_layer_current), (None, None)):
        stacked = runner.score(state, candidates, prefix).totals
        per_layer = runner.score(per_layer_state, candidates, per_layer_prefix).totals
        torch.testing.assert_close(stacked, per_layer, atol=TOL, rtol=1e-5)
    per_layer_grad = runner.gradient_pass(per_layer_state, batch)
    torch.testing.assert_close(per_layer_grad.scores.totals, runner.gradient_pass(state, batch).scores.totals)


def test_layers_that_differ_in_shape_keep_their_caches_per_layer() -> None:
    # A model whose layers' caches differ (a sliding-window layer holding fewer positions, values of
    # another width) cannot be stacked: the state keeps one tensor pair per layer, left-padded.
    keys, wide = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 8)

    def state(kv: list, width: int) -> PromptState:
        return PromptState(kv, torch.ones(1, width), torch.tensor([width]), torch.zeros(1, 5))

    row = state([(keys, keys), (keys, wide)], 3)
    short = state([(keys[:, :, 1:], keys[:, :, 1:]), (keys[:, :, 1:], wide[:, :, 1:])], 2)
    assert stack_layers(row.kv) is None
    batch = PromptState.stack([row, short])
    assert batch.stacked is None and batch.kv[1][1].shape == (2, 2, 3, 8)
    torch.testing.assert_close(batch.kv[1][1][1, :, 1:], wide[0, :, 1:])
    assert float(batch.kv[1][1][1, :, 0].abs().sum()) == 0.0  # left padding
    same = state([(keys, keys)] * 2, 3)
    both = PromptState.stack([same, state([(keys[:, :, 1:], keys[:, :, 1:])] * 2, 2)])
    assert both.stacked is not None and both.stacked.shape == (2, 2, 2, 2, 3, 4)
    torch.testing.assert_close(both.kv[1][0][1, :, 1:], keys[0, :, 1:])


@pytest.mark.parametrize("span_words", [1, 2])
def test_a_lookahead_over_the_whole_rest_of_the_output_gives_the_exact_gain(
    suite, tokenizer, monkeypatch, span_words
) -> None:
    # The lookahead scores an edit's tokens and the few after it exactly; reaching past the end of
    # the output, its estimate must be the edit's exact change of J (with every reading run). Its
    # products run in float32 here: by default they may round to bfloat16 (tests/test_packed.py).
    search = SearchConfig(
        lookahead_tokens=1000, lookahead_free_context=True, span_words=span_words, approximate_estimates=False
    )
    refiner = Refiner(suite.loaded, search=search)
    method = refiner.methods["coordinate"]
    seen: list = []
    original = method.choose

    def choose(step, shortlisted):
        seen.extend(shortlisted)
        return original(step, shortlisted)

    monkeypatch.setattr(method, "choose", choose)
    prompt, text, eos, _, keywords = CASES[1]
    prompt_ids, output = chat_prompt(tokenizer, prompt), output_ids(tokenizer, text, eos)
    config = RefineConfig(candidates=CANDIDATES, keywords=keywords)
    [result] = refiner.refine([RefineRequest(prompt_ids, output, config)])
    assert len(seen) > CANDIDATES  # more placements looked at than scored in full
    exact = refiner.score(prompt_ids, [p.body + output[-1:] for p in seen], config)
    gains = [e["total"] - result.objective_before["total"] for e in exact]
    assert [p.estimate for p in seen] == pytest.approx(gains, abs=TOL)


@pytest.mark.parametrize("span_words", [1, 2])
def test_keyword_placements_replace_at_most_span_words_words(
    suite, tokenizer, monkeypatch, span_words
) -> None:
    refiner = Refiner(suite.loaded, search=SearchConfig(span_words=span_words))
    method = refiner.methods["coordinate"]
    replaced: list[str] = []
    original = method.phrase_edits

    def every_placement(step, phrase, k):  # record every placement, return what the step would use
        placements = original(step, phrase, 10**6)
        replaced.extend(
            tokenizer.decode(e.old_tokens) for p in placements for e in p.edits if e.op == "replace"
        )
        return placements[:k]

    monkeypatch.setattr(method, "phrase_edits", every_placement)
    prompt = chat_prompt(
        tokenizer, "Write one short sentence that uses all of these words: dog, frisbee, park."
    )
    output = output_ids(tokenizer, "A dog plays in the park with a ball.")
    refiner.refine([RefineRequest(prompt, output, RefineConfig(keywords=("dog", "frisbee", "park")))])
    words = {len(r.split()) for r in replaced}
    assert words == set(range(1, span_words + 1)), replaced
    assert (" a ball" in replaced) == (span_words == 2)


def test_refining_with_generations_prompt_cache_matches_running_the_prompt(suite, tokenizer) -> None:
    # The server hands generation's prompt KV cache to the refiner; with it (for some rows, under
    # inference mode, from a left-padded batch) the step must do exactly what it does without.
    prompts = [r.prompt_ids for r in suite.requests]
    params = [SamplingParams(max_new_tokens=6, do_sample=i % 2 == 1, seed=i) for i in range(len(prompts))]
    outs = BatchGenerator(suite.loaded).generate(prompts, params, keep_prompt_cache=True)
    configs = [r.config for r in suite.requests]
    plain = [RefineRequest(p, o.token_ids, c) for p, o, c in zip(prompts, outs, configs)]
    cached = [
        RefineRequest(p, o.token_ids, c, o.prompt_cache if i != 1 else None)
        for i, (p, o, c) in enumerate(zip(prompts, outs, configs))
    ]
    for a, b in zip(suite.refiner.refine(plain), suite.refiner.refine(cached)):
        assert a.refined_ids == b.refined_ids
        assert a.objective_after["total"] == pytest.approx(b.objective_after["total"], abs=TOL)
    with pytest.raises(ValueError, match="prompt_cache"):
        RefineRequest(prompts[0] + [1], outs[0].token_ids, configs[0], outs[0].prompt_cache)


def test_scoring_passes_group_candidates_by_suffix_length() -> None:
    suffixes = [30, 29, 28, 5, 4, 4, 3, 2]
    # No fixed cost per pass: a pass per distinct length is cheapest; a large one: a single pass.
    assert plan_passes(suffixes, 8, 0.0) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 8)]
    assert plan_passes(suffixes, 8, 1000.0) == [(0, 8)]
    # A fixed cost of 32 rows: the long suffixes and the short ones go in separate passes.
    assert plan_passes(suffixes, 8, 32.0) == [(0, 3), (3, 8)]
    # Never more than max_size candidates per pass, and every candidate in exactly one pass.
    passes = plan_passes([7] * 10, 4, 32.0)
    assert len(passes) == 3 and all(b - a <= 4 for a, b in passes)
    assert (
        [a for a, _ in passes[1:]] == [b for _, b in passes[:-1]]
        and passes[0][0] == 0
        and passes[-1][1] == 10
    )
    assert plan_passes([], 4, 32.0) == []


def test_methods_see_embeddings_in_the_tables_own_scale(tokenizer) -> None:
    # Gemma 3 scales looked-up rows by sqrt(d): the methods compare the step's embeddings with the
    # embedding table, so they must be in the table's scale (and the gradient with them).
    loaded = ARCHITECTURES["gemma3"](tokenizer)
    refiner = Refiner(loaded)
    assert refiner.embed_scale == pytest.approx(loaded.model.config.hidden_size**0.5)
    seen = []
    original = refiner.methods["coordinate"].propose

    def spy(steps, lookahead):
        seen.extend(steps)
        return original(steps, lookahead)

    refiner.methods["coordinate"].propose = spy
    refiner.refine([RefineRequest(chat_prompt(tokenizer, "Hi."), output_ids(tokenizer, "A cat sat."))])
    [step] = seen
    assert torch.allclose(step.embeds, refiner.vocab.embedding[step.body], atol=1e-5)


def test_whitespace_pieces_added_to_a_vocabulary_are_text_not_control_tokens(tokenizer) -> None:
    # Gemma adds newline runs as whole tokens; an output ending in one must stay editable, while
    # control tokens (EOS, chat markers) are never written.
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["\n\n\n\n", "<made-up-marker>"])
    newlines, marker = tok.convert_tokens_to_ids(["\n\n\n\n", "<made-up-marker>"])
    vocab = Vocabulary(tok, torch.zeros(len(tok), 4))
    assert newlines not in vocab.special_ids and vocab.allowed[newlines]
    assert marker in vocab.special_ids and tok.eos_token_id in vocab.special_ids


def test_top_edits_are_the_largest_entries_of_the_gain_matrix_best_first():
    from refiners.methods.coordinate import top_edits

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows, vocab = (int(x) for x in torch.randint(1, 300, (2,), generator=generator))
        gains = torch.randn(rows % 20 + 1, vocab, generator=generator)
        gains[:, ::3] = float("-inf")  # forbidden tokens
        k = int(torch.randint(1, 40, (), generator=generator))
        values, flat = gains.flatten().topk(min(k, gains.numel()))
        expected = [(v, *divmod(i, gains.shape[1])) for v, i in zip(values.tolist(), flat.tolist())]
        got = top_edits(gains, k)
        assert [g[0] for g in got] == [e[0] for e in expected]
        finite = [e for e in expected if e[0] > float("-inf")]  # forbidden ones tie, in any order
        assert got[: len(finite)] == finite


def test_of_spellings_sharing_a_first_token_at_one_place_only_the_shortest_is_kept_at_their_best_rank():
    from refiners.edits import Edit
    from refiners.methods.coordinate import shortest_spellings

    bikini, bikinis, bikiniing, other = (5, 6), (5, 6, 7), (5, 6, 8, 9), (4,)
    ranked = [  # (-estimate, (spelling, boundary, words replaced), edit), best first
        (-3.0, (2, 1, 0), Edit("insert", 3, (), bikiniing)),
        (-2.0, (0, 0, 0), Edit("insert", 1, (), other)),
        (-1.0, (1, 1, 0), Edit("insert", 3, (), bikinis)),
        (-0.5, (0, 1, 0), Edit("insert", 3, (), bikini)),
        (0.5, (0, 1, 1), Edit("replace", 3, (10,), bikini)),
        (1.0, (1, 1, 1), Edit("replace", 3, (10,), bikinis)),
    ]
    kept = shortest_spellings(ranked)
    assert [(r[2].op, r[2].new_tokens) for r in kept] == [
        ("insert", bikini),  # at the rank of "bikiniing", the best of its place
        ("insert", other),
        ("replace", bikini),
    ]


def test_a_fluency_floor_keeps_only_changes_that_do_not_lower_the_fluency_term():
    tok = embedded_tokenizer()
    loaded = ARCHITECTURES["llama"](tok)
    free_refiner = Refiner(loaded)
    floored_refiner = Refiner(loaded, search=SearchConfig(fluency_floor=0.0))
    # The first of these requests whose best change, without the floor, trades fluency for J on this
    # random model: with the floor, another change (or none) is kept.
    for keywords in [
        ("dog", "ball"),
        ("dog", "frisbee"),
        ("ball", "park"),
        ("dog", "lake"),
        ("bird", "tree"),
    ]:
        request = RefineRequest(
            chat_prompt(tok, f"Write about a {keywords[0]} and a {keywords[1]}."),
            output_ids(tok, "The cat sat on the mat near the house."),
            RefineConfig(keywords=keywords),
        )
        [free] = free_refiner.refine([request])
        if free.objective_after["fluency"] < free.objective_before["fluency"]:
            break
    else:
        pytest.fail("no request's best change lowers the fluency term on this model")
    [floored] = floored_refiner.refine([request])
    assert floored.objective_after["fluency"] >= floored.objective_before["fluency"]
    assert floored.objective_after["total"] >= floored.objective_before["total"]


def test_stacked_edits_are_scored_in_the_same_pass_as_the_single_ones(tokenizer, monkeypatch) -> None:
    loaded = tiny_llama(tokenizer)
    refiner = Refiner(loaded)
    monkeypatch.setattr(refiner.runner, "pass_overhead", 1e9)  # each read of outputs: one pass
    prompt = chat_prompt(tokenizer, "Use these words: dog, frisbee, park, lake.")
    output = output_ids(tokenizer, "A dog plays with a ball.")
    config = RefineConfig(
        candidates=12, keywords=("dog", "frisbee", "park", "lake"), weights={"keywords": 100.0}
    )
    refiner.refine([RefineRequest(prompt, output, config)])  # the first call also reads a document start
    passes = []  # counted at the body: scoring passes run it and the head apart (split_head)
    hook = loaded.model.model.register_forward_pre_hook(lambda *_: passes.append(1))
    [result] = refiner.refine([RefineRequest(prompt, output, config)])
    hook.remove()
    # The prompt, the gradient pass, the lookahead and one scoring pass: no second pass for the stacks.
    assert len(passes) == 4
    assert len(result.edits) >= 2 and {e["step"] for e in result.edits} == {0}
    assert result.objective_after["keywords"] >= result.objective_before["keywords"] + 2


def test_generation_and_refinement_passes_run_without_cudnn_attention(tokenizer) -> None:
    # cuDNN's attention builds a graph per input shape (see refiners.models.shape_free_attention).
    loaded = tiny_llama(tokenizer)
    seen = []
    # At the body: every pass runs it (scoring passes run the head apart, see split_head).
    loaded.model.model.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    assert torch.backends.cuda.cudnn_sdp_enabled()
    prompt = chat_prompt(tokenizer, "Use the word dog.")
    [out] = BatchGenerator(loaded).generate([prompt], [SamplingParams(max_new_tokens=4)])
    Refiner(loaded).refine([RefineRequest(prompt, list(out.token_ids), RefineConfig(keywords=("dog",)))])
    assert len(seen) >= 6 and not any(seen)  # prefill, decode steps, prompt, gradient, lookahead, scoring
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the process's setting is restored


def test_the_picked_log_probabilities_and_their_gradient_are_log_softmax_and_gathers() -> None:
    from refiners.scoring import _LogSoftmaxPicked

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 300, dtype=torch.float64)
    picked = torch.randint(0, 300, (2, 5))
    upstream = torch.randn(2, 5, dtype=torch.float64)
    mine, theirs = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    values, distributions = _LogSoftmaxPicked.apply(mine, picked)
    expected = torch.log_softmax(theirs, -1).gather(-1, picked[..., None]).squeeze(-1)
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(distributions, torch.log_softmax(logits, -1))
    assert not distributions.requires_grad
    (g_mine,) = torch.autograd.grad((values * upstream).sum(), mine)
    (g_theirs,) = torch.autograd.grad((expected * upstream).sum(), theirs)
    torch.testing.assert_close(g_mine, g_theirs)


def test_scoring_runs_the_head_a_slice_at_a_time_with_the_same_numbers(suite, tokenizer, monkeypatch) -> None:
    runner = suite.refiner.runner
    assert runner._head is not None  # every test architecture's logits are its head's output
    state, current, _, candidates = two_outputs_and_their_candidates(runner, tokenizer)
    monkeypatch.setattr(runner, "_head_rows", 3)  # several slices in every pass, the last one short
    sliced = runner.score(state, candidates, current).totals
    monkeypatch.setattr(runner, "_head", None)
    whole = runner.score(state, candidates, current).totals
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)


def test_a_model_whose_logits_are_changed_after_its_head_is_not_split(tokenizer) -> None:
    from refiners.models import split_head
    from tests.tiny_models import tiny_gemma3

    loaded = tiny_gemma3(tokenizer)
    assert split_head(loaded.model) is not None
    loaded.model.config.final_logit_softcapping = 30.0  # Gemma 2's: tanh after the head
    assert split_head(loaded.model) is None
    loaded.model.config.final_logit_softcapping = None
    forward = loaded.model.forward

    def scaled(*args, **kwargs):  # as Cohere's or Granite's logit scale: found by the check itself
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    loaded.model.forward = scaled
    assert split_head(loaded.model) is None
