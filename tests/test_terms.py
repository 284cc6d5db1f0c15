"""The reference, avoid and reward terms: in the library (tiny and embedded models) and over HTTP."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from rapidfuzz.distance import Levenshtein
from transformers import LlamaConfig, LlamaForSequenceClassification

from refiners import RefineConfig, Refiner, RefineRequest
from refiners.alignment import align
from refiners.errors import InvalidRequestError, ModelLoadError
from refiners.keywords import keyword_present
from refiners.objective import Objective, ReferenceTerm
from refiners.reward import RewardModelTerm, load_reward_model
from tests.tiny_models import eos_id


def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def encoded(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) + [eos_id(tokenizer)]


# -- the alignment ---------------------------------------------------------------------------------


def test_alignment_with_unit_costs_is_the_levenshtein_distance() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randint(0, 4) for _ in range(rng.randint(0, 9))]
        b = [rng.randint(0, 4) for _ in range(rng.randint(0, 9))]
        costs = np.array([[float(x != y) for y in b] for x in a]).reshape(len(a), len(b))
        pairs, unpaired = align(costs, 1.0)
        assert sum(costs[t, j] for t, j in pairs) + unpaired == Levenshtein.distance(a, b)
        assert 2 * len(pairs) + unpaired == len(a) + len(b)
        assert pairs == sorted(pairs) and len({t for t, _ in pairs}) == len({j for _, j in pairs}) == len(
            pairs
        )


# -- reference ---------------------------------------------------------------------------------------

REFERENCE = "A dog plays with a frisbee in the park."
# Rewrites of the reference, closest first (by token edit distance).
REWRITES = [
    "A dog plays with a frisbee in the green park.",
    "A dog plays with a ball in the green park.",
    "A dog runs in the park.",
    "A dog plays happily in the green park with a frisbee.",
    "A dog runs happily in the green park with a ball.",
]


def test_reference_term_rises_as_the_text_comes_closer(embedded_model) -> None:
    refiner, tok = Refiner(embedded_model), embedded_model.tokenizer
    config = RefineConfig(reference=REFERENCE)
    texts = [REFERENCE, *REWRITES]
    scores = refiner.score(chat(tok, "A sentence."), [encoded(tok, t) for t in texts], config)
    values = [s["reference"] for s in scores]
    distances = [Levenshtein.distance(tok.encode(t), tok.encode(REFERENCE)) for t in texts]
    assert values[0] == pytest.approx(0.0, abs=1e-5)
    assert distances == sorted(distances)
    assert values == sorted(values, reverse=True), list(zip(texts, values))


def test_reference_term_is_differentiable_and_reported_only_when_given(tiny_model) -> None:
    refiner, tok = Refiner(tiny_model), tiny_model.tokenizer
    prompt, output = chat(tok, "Say something."), encoded(tok, "A cat sat on a mat.")
    term = next(t for t in refiner.objective.terms if isinstance(t, ReferenceTerm))
    assert term.differentiable
    [plain] = refiner.refine([RefineRequest(prompt, output, RefineConfig())])
    assert "reference" not in plain.objective_before
    config = RefineConfig(reference="A dog sat on a log.", weights={"logprob": 0.0, "fluency": 0.0})
    [result] = refiner.refine([RefineRequest(prompt, output, config)])
    assert result.objective_before["reference"] < 0
    assert result.objective_after["reference"] >= result.objective_before["reference"]


def test_one_step_on_the_reference_alone_moves_towards_it_never_away(embedded_model) -> None:
    refiner, tok = Refiner(embedded_model), embedded_model.tokenizer
    cases = [
        ("Write a sentence about a dog in a park.", REWRITES[4], REFERENCE),
        (
            "Describe the kitchen.",
            "The kitchen is small and very clean.",
            "The kitchen is big and very bright.",
        ),
        (
            "What did the boy do?",
            "The boy kicked the red ball over the fence.",
            "The boy threw the ball over the wall.",
        ),
        (
            "Tell me about the weather.",
            "It is raining heavily in the city today.",
            "It is sunny in the city today.",
        ),
    ]
    only_reference = {"logprob": 0.0, "fluency": 0.0}
    requests = [
        RefineRequest(chat(tok, p), encoded(tok, out), RefineConfig(reference=ref, weights=only_reference))
        for p, out, ref in cases
    ]
    moved = 0
    for (_, _, ref), result in zip(cases, refiner.refine(requests)):
        before = Levenshtein.distance(tok.encode(result.initial_text), tok.encode(ref))
        after = Levenshtein.distance(tok.encode(result.refined_text), tok.encode(ref))
        assert after <= before, (result.initial_text, result.refined_text, ref)
        assert result.objective_after["reference"] >= result.objective_before["reference"]
        moved += after < before
    assert moved == len(cases)


# -- avoid -----------------------------------------------------------------------------------------


def test_avoid_conflicts_with_keywords_and_counts_like_keywords() -> None:
    with pytest.raises(InvalidRequestError, match="both a keyword and a word to avoid"):
        RefineConfig(keywords=("dog",), avoid=("dogs",))
    with pytest.raises(InvalidRequestError, match="at most"):
        RefineConfig(avoid=tuple(f"w{i}" for i in range(40)))
    with pytest.raises(InvalidRequestError, match="reference is empty"):
        RefineConfig(reference="   ")
    assert RefineConfig(avoid=(" ball ", "")).avoid == ("ball",)


def test_avoided_words_present_are_removed(embedded_model) -> None:
    refiner, tok = Refiner(embedded_model), embedded_model.tokenizer
    prompt = chat(tok, "Write one short sentence about a dog in a park.")
    output = encoded(tok, "A dog runs happily in the green park with a ball.")
    [result] = refiner.refine([RefineRequest(prompt, output, RefineConfig(avoid=("ball",)))])
    assert result.objective_before["avoid"] == -1.0
    assert result.objective_after["avoid"] == 0.0
    assert not keyword_present("ball", result.refined_text)
    assert any(e["op"] in ("delete", "replace") and "ball" in e["old_text"] for e in result.edits)


def test_a_word_to_avoid_is_never_written_even_when_other_terms_want_it(tiny_model) -> None:
    refiner, tok = Refiner(tiny_model), tiny_model.tokenizer
    prompt, output = chat(tok, "Say something."), encoded(tok, "A cat sat on a mat.")
    wants = {"keywords": 1000.0}
    [control] = refiner.refine(
        [RefineRequest(prompt, output, RefineConfig(keywords=("hot dog",), weights=wants))]
    )
    assert keyword_present("hot dog", control.refined_text)  # the keyword is placed when nothing forbids it
    config = RefineConfig(keywords=("hot dog",), avoid=("hot",), weights=wants, steps=3)
    [result] = refiner.refine([RefineRequest(prompt, output, config)])
    assert not keyword_present("hot", result.refined_text)
    assert result.objective_after["avoid"] == 0.0


def test_a_present_keyword_is_never_traded_for_a_missing_one(tiny_model) -> None:
    refiner, tok = Refiner(tiny_model), tiny_model.tokenizer
    prompt = chat(tok, "Say something.")
    requests = [
        RefineRequest(
            prompt, encoded(tok, text), RefineConfig(keywords=("cat", "dog", "mat"), candidates=24, steps=2)
        )
        for text in ("A cat sat on a mat.", "The cat is here.", "My mat.")
    ]
    for request, result in zip(requests, refiner.refine(requests)):
        for k in request.config.keywords:
            if keyword_present(k, result.initial_text):
                assert keyword_present(k, result.refined_text), (k, result.refined_text)


# -- reward model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model) -> Path:
    """A 2-layer random-weight Llama sequence classifier with one output, saved like a hub model."""
    torch.manual_seed(1)
    tok = tiny_model.tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("reward")
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_scores_every_candidate_in_one_batched_forward(tiny_model, reward_dir) -> None:
    term = load_reward_model(str(reward_dir), device="cpu")
    calls: list[int] = []
    term.model.register_forward_hook(
        lambda _m, args, kwargs, _out: calls.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    refiner, tok = Refiner(tiny_model, extra_terms=[term]), tiny_model.tokenizer
    prompt, output = chat(tok, "Say something."), encoded(tok, "A cat sat on a mat.")
    [off] = refiner.refine([RefineRequest(prompt, output, RefineConfig())])
    assert "reward" not in off.objective_before and not calls  # off unless weighted
    [result] = refiner.refine(
        [RefineRequest(prompt, output, RefineConfig(weights={"reward": 1.0}, candidates=8))]
    )
    assert result.candidates_scored > len(calls) - 1  # one forward per pass, not one per candidate
    assert max(calls) > 1
    # The reported value is the model's score of the chat-formatted prompt and output.
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": tok.decode(prompt, skip_special_tokens=True)},
            {"role": "assistant", "content": result.initial_text},
        ],
        tokenize=False,
    )
    with torch.no_grad():
        expected = term.model(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
    assert result.objective_before["reward"] == pytest.approx(float(expected), abs=1e-4)


def test_a_reward_model_needs_one_output(tmp_path, tiny_model) -> None:
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=2,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="one output"):
        load_reward_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not load"):
        load_reward_model(str(tmp_path / "missing"))
    assert RewardModelTerm.name == "reward" and Objective([]).names == []


# -- over HTTP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_server(server_factory, tiny_model, reward_dir):
    live = server_factory(tiny_model, reward_model=str(reward_dir), max_keywords=4)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def plain_server(server_factory, tiny_model):
    live = server_factory(tiny_model)
    yield live
    live.stop()


def generate(live, refine: dict) -> httpx.Response:
    body = {"inputs": "Say something.", "parameters": {"max_new_tokens": 6, "refine": refine}}
    return httpx.post(f"{live.url}/generate", json=body, timeout=120)


def test_info_lists_the_terms_and_their_default_weights(reward_server, plain_server) -> None:
    with_reward = httpx.get(f"{reward_server.url}/info").json()["refine_defaults"]
    assert with_reward["terms"]["reward"] == 0.0 and with_reward["terms"]["reference"] == 32.0
    assert with_reward["terms"]["avoid"] == 3.0 and with_reward["terms"]["keywords"] == 3.0
    assert with_reward["reward_model"] == str(reward_dir_of(reward_server))
    plain = httpx.get(f"{plain_server.url}/info").json()["refine_defaults"]
    assert "reward" not in plain["terms"] and plain["reward_model"] is None


def reward_dir_of(live) -> str:
    return live.app.state.service.settings.reward_model


def test_terms_are_reported_under_their_names_over_http(reward_server) -> None:
    r = generate(reward_server, {"reference": "A cat sat.", "avoid": ["dog"], "weights": {"reward": 2.0}})
    assert r.status_code == 200, r.text
    refinement = r.json()["details"]["refinement"]
    for name in ("reference", "avoid", "reward"):
        assert name in refinement["objective_before"] and name in refinement["objective_after"]
    assert refinement["objective_after"]["total"] >= refinement["objective_before"]["total"]


@pytest.mark.parametrize(
    ("refine", "message"),
    [
        ({"reference": ""}, "reference is empty"),
        ({"reference": "  \n "}, "reference is empty"),
        ({"avoid": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"keywords": ["dog"], "avoid": ["dogs"]}, "both a keyword and a word to avoid"),
    ],
)
def test_bad_terms_input_is_a_422_that_says_what_to_fix(reward_server, refine, message) -> None:
    r = generate(reward_server, refine)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"] and r.json()["error_type"] == "validation"


def test_a_reward_weight_without_a_reward_model_is_a_422(plain_server) -> None:
    r = generate(plain_server, {"weights": {"reward": 1.0}})
    assert r.status_code == 422, r.text
    assert "--reward-model" in r.json()["error"]
