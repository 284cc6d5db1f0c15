"""The HTTP contract of issue 3, field by field, against a live server with the embedded model."""

from __future__ import annotations

import gc
from typing import Any

import httpx
import jsonschema
import pytest

from refiners import DEFAULT_WEIGHTS
from tests.conftest import LiveServer, sse_events

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time"  # instruction-like prompts often end at once (EOS) with this small model
NEW_TOKENS = 8
REFINEMENT_FIELDS = {
    "method",
    "initial_text",
    "objective_before",
    "objective_after",
    "edits",
    "candidates_scored",
    "generate_seconds",
    "refine_seconds",
    "prompt_seconds",
    "gradient_seconds",
    "propose_seconds",
    "lookahead_seconds",
    "scoring_seconds",
}
STEP_PARTS = ("prompt", "gradient", "propose", "lookahead", "scoring")


@pytest.fixture(scope="module")
def server(server_factory, embedded_model) -> LiveServer:
    live = server_factory(embedded_model, refine_default_candidates=4, max_batch_size=4)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer):
    with server.client() as c:
        yield c


def generate(client: httpx.Client, path: str = "/generate", inputs: str = PROMPT, **parameters) -> dict:
    parameters.setdefault("max_new_tokens", NEW_TOKENS)
    r = client.post(path, json={"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_ready_server_has_frozen_what_start_up_left(client: httpx.Client):
    # The ~340,000 objects start-up leaves are moved out of the collector's generations, so a full
    # collection (0.2-0.3 s of walking them) never lands in the middle of a request's step.
    assert client.get("/health").status_code == 200
    assert gc.get_freeze_count() > 100_000


def test_health_and_info(client: httpx.Client):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["model_id"] == "embedded:smollm2-135m-instruct"
    assert info["model_dtype"] == "float32"
    assert info["model_device_type"] == "cpu"
    assert (
        info["max_input_tokens"] == 1024
        and info["max_total_tokens"] == 2048
        and info["max_new_tokens"] == 512
    )
    defaults = info["refine_defaults"]
    assert {k: v for k, v in defaults.items() if k not in ("terms", "reward_model")} == {
        "enabled": True,
        "method": "coordinate",
        "steps": 1,
        "candidates": 4,
        "max_candidates": 256,
        "max_keywords": 32,
    }
    assert defaults["terms"] == DEFAULT_WEIGHTS and defaults["reward_model"] is None
    assert info["version"]


def test_default_request_is_refined_and_reports_refinement(client: httpx.Client):
    body = generate(client)
    details = body["details"]
    refinement = details["refinement"]
    assert REFINEMENT_FIELDS <= set(refinement)
    assert refinement["method"] == "coordinate"
    assert refinement["refined_text"] == body["generated_text"]
    assert "total" in refinement["objective_before"] and "total" in refinement["objective_after"]
    assert refinement["objective_after"]["total"] >= refinement["objective_before"]["total"]
    # The step always runs; its lookahead may find no candidate worth a full score.
    assert 0 <= refinement["candidates_scored"] <= 4 and refinement["refine_seconds"] > 0
    # Alone in its batch, the request's share of the step is all of it: the parts add up to it.
    parts = sum(refinement[f"{part}_seconds"] for part in STEP_PARTS)
    assert 0 < parts <= refinement["refine_seconds"] + 1e-3
    assert details["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert 1 <= details["generated_tokens"] <= NEW_TOKENS
    assert details["seed"] is None  # greedy
    assert "tokens" not in details  # only when asked for


def test_min_new_tokens_gives_outputs_of_an_exact_length(client: httpx.Client):
    for n in (3, NEW_TOKENS):
        params = {"max_new_tokens": n, "min_new_tokens": n, "details": True, "refine": {"enabled": False}}
        answer = client.post("/generate", json={"inputs": "Say hi.", "parameters": params})
        assert answer.status_code == 200 and answer.json()["details"]["generated_tokens"] == n
    params = {"max_new_tokens": 4, "min_new_tokens": 5}
    refused = client.post("/generate", json={"inputs": "Say hi.", "parameters": params})
    assert refused.status_code == 422 and "min_new_tokens" in refused.json()["error"]


def test_initial_text_equals_plain_generation_with_the_same_seed(client: httpx.Client):
    for params in ({}, {"do_sample": True, "seed": 1234, "temperature": 0.8}):
        plain = generate(client, refine={"enabled": False}, **params)
        refined = generate(client, refine={"method": "gradient", "candidates": 4}, **params)
        assert plain["details"]["refinement"] is None
        assert refined["details"]["refinement"]["initial_text"] == plain["generated_text"]
        assert refined["details"]["refinement"]["method"] == "gradient"
        if params:
            assert plain["details"]["seed"] == refined["details"]["seed"] == 1234


def test_details_tokens_prefill_and_full_text(client: httpx.Client):
    body = generate(
        client, details=True, decoder_input_details=True, return_full_text=True, refine={"enabled": False}
    )
    details = body["details"]
    assert body["generated_text"].startswith(PROMPT)
    assert len(details["tokens"]) == details["generated_tokens"]
    for token in details["tokens"]:
        assert set(token) == {"id", "text", "logprob", "special"}
        assert token["logprob"] <= 0.0
    text = "".join(t["text"] for t in details["tokens"] if not t["special"])
    assert PROMPT + text == body["generated_text"]
    assert "".join(t["text"] for t in details["prefill"] if not t["special"]) == PROMPT
    truncated = generate(
        client, details=True, decoder_input_details=True, truncate=3, refine={"enabled": False}
    )
    assert len(truncated["details"]["prefill"]) == 3


# Weights none of the defaults has (logprob 1, fluency 0.75, length 1, keywords 3).
WEIGHTS = {"logprob": 0.7, "fluency": 0.3, "length": 1.5, "keywords": 2.0}


def test_keywords_and_weights_reach_the_objective(client: httpx.Client):
    # A target no 8-token output reaches, so that the length term is never 0.
    refine = {"keywords": ["ocean"], "candidates": 4, "target_length": 100}
    objective = generate(client, refine={**refine, "weights": WEIGHTS})["details"]["refinement"][
        "objective_before"
    ]
    parts = {name: value for name, value in objective.items() if name != "total"}
    assert {"keywords", "length", "logprob"} <= set(parts) <= set(WEIGHTS)
    # The total is the sum of the reported (unweighted) terms under the weights sent.
    weighted = sum(WEIGHTS[name] * value for name, value in parts.items())
    assert objective["total"] == pytest.approx(weighted, rel=1e-4, abs=1e-4)
    # Doubling one weight moves the total by that term's value once more, and nothing else.
    doubled = {**WEIGHTS, "length": 2 * WEIGHTS["length"]}
    other = generate(client, refine={**refine, "weights": doubled})["details"]["refinement"][
        "objective_before"
    ]
    assert parts["length"] < 0
    assert other["length"] == pytest.approx(parts["length"], abs=1e-6)
    assert other["total"] - objective["total"] == pytest.approx(WEIGHTS["length"] * parts["length"], abs=1e-4)


def test_best_of_returns_the_best_sequence(client: httpx.Client):
    body = generate(client, best_of=2, do_sample=True, details=True, refine={"enabled": False})
    details = body["details"]
    assert 1 <= details["generated_tokens"] == len(details["tokens"])
    assert details["seed"] is not None
    # best_of 2: the answer is the best sequence, the other one is listed with its own seed.
    (other,) = details["best_of_sequences"]
    assert {"generated_text", "finish_reason", "generated_tokens", "seed", "tokens"} <= set(other)
    assert 1 <= other["generated_tokens"] == len(other["tokens"])
    assert other["seed"] is not None and other["seed"] != details["seed"]


def test_generate_stream_events(client: httpx.Client):
    plain = generate(client, refine={"enabled": False})["generated_text"]
    with client.stream(
        "POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS}}
    ) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    final = events[-1]
    assert final["details"]["generated_tokens"] == len(events)
    assert final["details"]["refinement"]["initial_text"] == plain
    assert final["generated_text"] == final["details"]["refinement"]["refined_text"]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == plain


def test_root_route_dispatches_on_stream(client: httpx.Client):
    r = client.post(
        "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "refine": {"enabled": False}}}
    )
    assert r.status_code == 200
    assert isinstance(r.json(), list) and r.json()[0]["generated_text"].strip()
    with client.stream(
        "POST",
        "/",
        json={
            "inputs": PROMPT,
            "stream": True,
            "parameters": {"max_new_tokens": 3, "refine": {"enabled": False}},
        },
    ) as s:
        events = sse_events(s.iter_lines())
    assert events[-1]["generated_text"] == r.json()[0]["generated_text"]


def test_refine_route_refines_a_given_output(client: httpx.Client):
    output = "The sea is very big and blue."
    r = client.post(
        "/refine",
        json={
            "inputs": PROMPT,
            "output": output,
            "parameters": {"refine": {"keywords": ["waves"], "candidates": 4}},
        },
    )
    assert r.status_code == 200, r.text
    refinement = r.json()["refinement"]
    assert refinement["initial_text"] == output
    assert r.json()["generated_text"] == refinement["refined_text"]
    assert refinement["objective_after"]["total"] >= refinement["objective_before"]["total"]


def test_metrics_count_requests_by_route_template(client: httpx.Client):
    client.get("/info")
    text = client.get("/metrics").text
    assert 'refiner_requests_total{route="/info",status="200"}' in text
    assert 'refiner_requests_total{route="/generate",status="200"}' in text
    for name in (
        "refiner_request_duration_seconds_bucket",
        "refiner_requests_in_flight",
        "refiner_generation_duration_seconds",
        "refiner_generated_tokens_total",
        "refiner_queue_size",
        "refiner_batch_size",
        "refiner_model_info",
    ):
        assert name in text, name


def test_openapi_schema_lists_the_routes(client: httpx.Client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/",
        "/generate",
        "/generate_stream",
        "/refine",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/info",
        "/health",
        "/metrics",
    ):
        assert path in paths, path


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties refusing any other: an answer field the
    schema does not declare then fails validation instead of passing unnoticed."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(item) for item in schema]
    return schema


class OpenAPIDocument:
    """Checks answers against the response schemas of the server's own ``/openapi.json``."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = _closed(document)

    def check(
        self, method: str, path: str, body: Any, media_type: str = "application/json", status: int = 200
    ) -> None:
        parts = ("paths", path, method, "responses", str(status), "content", media_type, "schema")
        schema = self.document
        for part in parts:
            schema = schema[part]
        if "$id" in schema:  # a schema resource of its own (an event stream's): its $defs are inside it
            validator = jsonschema.Draft202012Validator(schema)
        else:  # validate against the whole document so that "#/components/schemas/..." resolves
            pointer = "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)
            validator = jsonschema.Draft202012Validator({**self.document, "$ref": f"#/{pointer}"})
        errors = sorted(validator.iter_errors(body), key=str)
        assert not errors, f"{method.upper()} {path} ({status}, {media_type}): {errors[0].message}"


def test_answers_match_the_response_models_of_the_openapi_schema(client: httpx.Client):
    openapi = OpenAPIDocument(client.get("/openapi.json").json())
    small = {"max_new_tokens": 3, "refine": {"candidates": 2}}
    gets = {
        "/health": client.get("/health"),
        "/info": client.get("/info"),
        "/v1/models": client.get("/v1/models"),
    }
    posts = {
        "/generate": [
            {"inputs": PROMPT, "parameters": {**small, "details": True, "decoder_input_details": True}},
            {"inputs": PROMPT, "parameters": {**small, "best_of": 2, "do_sample": True, "details": True}},
        ],
        "/": [{"inputs": PROMPT, "parameters": small}],
        "/refine": [{"inputs": PROMPT, "output": "The sea.", "parameters": {"refine": {"candidates": 2}}}],
        "/v1/completions": [
            {"prompt": [PROMPT, "Hi"], "n": 2, "max_tokens": 3, "echo": True, "logprobs": 1, "seed": 1},
        ],
        "/v1/chat/completions": [
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True},
        ],
    }
    for path, r in gets.items():
        assert r.status_code == 200, r.text
        openapi.check("get", path, r.json())
    for path, bodies in posts.items():
        for body in bodies:
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            openapi.check("post", path, r.json())
    refused = client.post("/generate", json={"inputs": ""})
    assert refused.status_code == 422
    openapi.check("post", "/generate", refused.json(), status=422)


def test_streamed_events_match_the_event_schemas_of_the_openapi_schema(client: httpx.Client):
    openapi = OpenAPIDocument(client.get("/openapi.json").json())
    usage = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
    streams = {
        "/generate_stream": {
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": 3, "refine": {"candidates": 2}},
        },
        "/v1/completions": {"prompt": PROMPT, "echo": True, **usage},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], **usage},
    }
    for path, body in streams.items():
        with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        payloads = [e for e in events if e != "[DONE]"]
        assert len(payloads) >= 2, events
        for event in payloads:
            openapi.check("post", path, event, media_type="text/event-stream")
        if path.startswith("/v1/"):
            assert events[-1] == "[DONE]" and payloads[-1]["usage"]["completion_tokens"] >= 1
