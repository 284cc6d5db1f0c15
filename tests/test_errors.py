"""Bad requests get the TGI error body with the right status, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import pytest

from refiners.config import MAX_LENGTH_PENALTY, MAX_WEIGHT
from tests.conftest import LiveServer

MAX_INPUT_TOKENS = 64
MAX_NEW_TOKENS = 16
MAX_KEYWORDS = 4
MAX_CANDIDATES = 16
MAX_BODY_BYTES = 4096
MAX_TOTAL_TOKENS = MAX_INPUT_TOKENS + 8  # < input cap + new-token cap: the total check matters


@pytest.fixture(scope="module")
def server(server_factory, tiny_model) -> LiveServer:
    live = server_factory(
        tiny_model,
        max_input_tokens=MAX_INPUT_TOKENS,
        max_total_tokens=MAX_TOTAL_TOKENS,
        max_new_tokens=MAX_NEW_TOKENS,
        max_keywords=MAX_KEYWORDS,
        max_candidates=MAX_CANDIDATES,
        refine_default_candidates=4,
        max_body_bytes=MAX_BODY_BYTES,
    )
    yield live
    live.stop()


def gen(inputs: Any = "Hello there", **parameters: Any) -> dict[str, Any]:
    return {"inputs": inputs, "parameters": parameters}


LONG_INPUT = "word " * (MAX_INPUT_TOKENS * 2)

# (case id, path, JSON body, words the error message must contain)
BAD_JSON_REQUESTS = [
    ("empty inputs", "/generate", gen(""), ["inputs"]),
    ("missing inputs", "/generate", {"parameters": {}}, ["inputs"]),
    ("inputs not a string", "/generate", gen(123), ["inputs"]),
    (
        "over-long inputs",
        "/generate",
        gen(LONG_INPUT, max_new_tokens=2),
        ["max_input_tokens", str(MAX_INPUT_TOKENS)],
    ),
    ("max_new_tokens over cap", "/generate", gen(max_new_tokens=MAX_NEW_TOKENS + 1), ["max_new_tokens"]),
    ("max_new_tokens zero", "/generate", gen(max_new_tokens=0), ["max_new_tokens"]),
    ("negative temperature", "/generate", gen(temperature=-1.0, do_sample=True), ["temperature"]),
    ("top_p zero", "/generate", gen(top_p=0.0), ["top_p"]),
    ("negative seed", "/generate", gen(seed=-3), ["seed"]),
    ("truncate zero", "/generate", gen(truncate=0), ["truncate"]),
    ("best_of without sampling", "/generate", gen(best_of=2), ["best_of", "sampling", "do_sample"]),
    ("best_of with seed", "/generate", gen(best_of=2, do_sample=True, seed=1), ["seed"]),
    ("best_of over limit", "/generate", gen(best_of=99, do_sample=True), ["best_of"]),
    ("best_of while streaming", "/", {**gen(best_of=2, do_sample=True), "stream": True}, ["best_of"]),
    ("unsupported watermark", "/generate", gen(watermark=True), ["watermark"]),
    ("unknown refine method", "/generate", gen(refine={"method": "beam"}), ["method"]),
    ("unknown refine field", "/generate", gen(refine={"keyword": ["x"]}), ["keyword"]),
    ("negative weight", "/generate", gen(refine={"weights": {"logprob": -1.0}}), ["weights"]),
    ("unknown weight term", "/generate", gen(refine={"weights": {"politeness": 1.0}}), ["politeness"]),
    ("too many keywords", "/generate", gen(refine={"keywords": ["a", "b", "c", "d", "e"]}), ["keywords"]),
    ("empty keyword", "/generate", gen(refine={"keywords": [""]}), ["keywords"]),
    ("candidates over cap", "/generate", gen(refine={"candidates": MAX_CANDIDATES + 1}), ["candidates"]),
    ("zero steps", "/generate", gen(refine={"steps": 0}), ["steps"]),
    ("negative length_penalty", "/generate", gen(refine={"length_penalty": -0.5}), ["length_penalty"]),
    ("target_length zero", "/generate", gen(refine={"target_length": 0}), ["target_length"]),
    ("max_new_tokens as a string", "/generate", gen(max_new_tokens="8"), ["max_new_tokens", "integer"]),
    ("max_new_tokens as a bool", "/generate", gen(max_new_tokens=True), ["max_new_tokens", "integer"]),
    ("do_sample as a string", "/generate", gen(do_sample="yes"), ["do_sample", "boolean"]),
    ("temperature as a string", "/generate", gen(temperature="0.5"), ["temperature", "number"]),
    ("refine steps as a string", "/generate", gen(refine={"steps": "1"}), ["refine.steps"]),
    ("completions: n as a string", "/v1/completions", {"prompt": "Hi", "n": "2"}, ["n", "integer"]),
    (
        "weight so large it overflows",
        "/generate",
        gen(refine={"weights": {"logprob": 1e38}}),
        ["weights.logprob", str(int(MAX_WEIGHT))],
    ),
    (
        "length_penalty over its bound",
        "/generate",
        gen(refine={"length_penalty": MAX_LENGTH_PENALTY + 0.5}),
        ["length_penalty", f"{MAX_LENGTH_PENALTY:g}"],
    ),
    ("stream: empty inputs", "/generate_stream", gen(""), ["inputs"]),
    ("refine: empty output", "/refine", {"inputs": "Q?", "output": ""}, ["output"]),
    (
        "refine: enabled false",
        "/refine",
        {"inputs": "Q?", "output": "A.", "parameters": {"refine": {"enabled": False}}},
        ["parameters.refine", "enabled", "/refine always refines", "/generate"],
    ),
    (
        "refine: bad method",
        "/refine",
        {"inputs": "Q?", "output": "A.", "parameters": {"refine": {"method": "x"}}},
        ["method"],
    ),
    ("completions: no prompt", "/v1/completions", {"model": "m"}, ["prompt"]),
    (
        "completions: max_tokens over cap",
        "/v1/completions",
        {"prompt": "Hi", "max_tokens": 10_000},
        ["max_tokens"],
    ),
    (
        "completions: negative weight",
        "/v1/completions",
        {"prompt": "Hi", "refine": {"weights": {"length": -2}}},
        ["weights"],
    ),
    ("completions: stream with n > 1", "/v1/completions", {"prompt": "Hi", "n": 2, "stream": True}, ["n"]),
    (
        "completions: best_of when greedy",
        "/v1/completions",
        {"prompt": "Hi", "best_of": 2, "temperature": 0},
        ["best_of", "sampling", "temperature"],
    ),
    (
        "completions: stream with several prompts",
        "/v1/completions",
        {"prompt": ["Hi", "Ho"], "stream": True},
        ["prompt", "one request per prompt"],
    ),
    ("chat: no messages", "/v1/chat/completions", {"messages": []}, ["messages"]),
    (
        "chat: unknown role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        ["role"],
    ),
    (
        "chat: tools",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        ["tools"],
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "words"), [c[1:] for c in BAD_JSON_REQUESTS], ids=[c[0] for c in BAD_JSON_REQUESTS]
)
def test_invalid_request_gets_422_with_tgi_error_body(
    server: LiveServer, path: str, body: Any, words: list[str]
):
    with server.client() as client:
        r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert set(payload) == {"error", "error_type"}
    assert payload["error_type"] == "validation"
    for word in words:
        assert word in payload["error"], payload["error"]


def test_non_json_body_gets_422(server: LiveServer):
    with server.client() as client:
        r = client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
        r2 = client.post("/generate", content=b"inputs=hello", headers={"Content-Type": "text/plain"})
        r3 = client.post("/generate", content=b"", headers={"Content-Type": "application/json"})
    for resp in (r, r2, r3):
        assert resp.status_code == 422, resp.text
        assert resp.json()["error_type"] == "validation"
    assert "JSON" in r.json()["error"]


def test_nan_is_rejected(server: LiveServer):
    with server.client() as client:
        r = client.post(
            "/generate",
            content=b'{"inputs": "x", "parameters": {"refine": {"length_penalty": NaN}}}',
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code == 422, r.text
    assert "length_penalty" in r.json()["error"]


def test_oversized_body_gets_413_before_parsing(server: LiveServer):
    big = b'{"inputs": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    with server.client() as client:
        r = client.post("/generate", content=big, headers={"Content-Type": "application/json"})

        def chunks():  # no Content-Length: the limit applies while the body streams in
            yield big[:1000]
            yield big[1000:]

        r_chunked = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    for resp in (r, r_chunked):
        assert resp.status_code == 413, resp.text
        assert resp.json()["error_type"] == "validation"
        assert str(MAX_BODY_BYTES) in resp.json()["error"]


def test_unknown_route_and_method_get_tgi_error_body(server: LiveServer):
    with server.client() as client:
        missing = client.post("/nope", json={})
        wrong_method = client.get("/generate")
    assert missing.status_code == 404
    assert missing.json()["error_type"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error_type"] == "method_not_allowed"


def test_truncate_makes_an_over_long_input_acceptable(server: LiveServer):
    with server.client() as client:
        r = client.post(
            "/generate",
            json=gen(
                LONG_INPUT,
                max_new_tokens=2,
                truncate=16,
                decoder_input_details=True,
                details=True,
                refine={"enabled": False},
            ),
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["details"]["prefill"]) == 16


def test_input_plus_new_tokens_over_total_gets_422(server: LiveServer):
    with server.client() as client:
        info = client.get("/info").json()
        r = client.post("/generate", json=gen("word " * 56, max_new_tokens=MAX_NEW_TOKENS))
        fits = client.post("/generate", json=gen("word " * 56, max_new_tokens=2, refine={"enabled": False}))
    assert info["max_total_tokens"] == MAX_TOTAL_TOKENS
    assert r.status_code == 422, r.text
    assert "max_total_tokens" in r.json()["error"]
    assert fits.status_code == 200, fits.text


def test_completions_best_of_is_accepted_when_sampling(server: LiveServer):
    # The default temperature (1) samples, so best_of has sequences to choose from.
    body = {"prompt": "Hi", "best_of": 2, "max_tokens": 2, "refine": {"enabled": False}}
    with server.client() as client:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text


def test_server_keeps_serving_after_bad_requests(server: LiveServer):
    with server.client() as client:
        for body in ({"inputs": ""}, {"inputs": "x", "parameters": {"refine": {"method": "?"}}}):
            assert client.post("/generate", json=body).status_code == 422
        ok = client.post("/generate", json=gen("Hi", max_new_tokens=2, refine={"candidates": 2}))
    assert ok.status_code == 200, ok.text
    assert ok.json()["details"]["refinement"]["method"] == "coordinate"


def test_numbers_of_the_right_json_type_are_accepted(server: LiveServer):
    # Strict types still take an int where a float is expected (JSON has one number type), nested
    # objects, a string or a list for stop, and content as text parts.
    full = gen(
        "Hello",
        max_new_tokens=4,
        do_sample=True,
        temperature=1,
        top_k=50,
        top_p=1,
        repetition_penalty=1,
        seed=3,
        stop=["\n\n"],
        details=True,
        decoder_input_details=True,
        return_full_text=False,
        truncate=32,
        refine={
            "enabled": True,
            "method": "coordinate",
            "steps": 1,
            "candidates": 2,
            "keywords": ["cat"],
            "length_penalty": 1,
            "target_length": 4,
            "weights": {"logprob": 1, "keywords": 2.5},
            "step_size": 1,
        },
    )
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "max_tokens": 2,
        "temperature": 1,
        "top_p": 1,
        "stop": "\n\n",
        "refine": {"enabled": False},
    }
    with server.client() as client:
        responses = [
            client.post("/generate", json=gen("Hi", max_new_tokens=2, temperature=1)),
            client.post("/generate", json=full),
            client.post("/v1/chat/completions", json=chat),
            client.post("/v1/completions", json={"prompt": ["Hi"], "max_tokens": 2, "temperature": 0}),
        ]
    for r in responses:
        assert r.status_code == 200, r.text


def test_extreme_accepted_refine_values_compute_finitely(server_factory, tiny_model):
    # Every bound at its limit at once, over an output as long as the default cap allows (512 tokens):
    # the length normaliser ((5 + n) / 6) ** alpha, the weighted terms and the gradient pass all stay
    # finite, so none of these is a 424.
    live = server_factory(tiny_model)
    extreme = {
        "keywords": ["cat"],
        "length_penalty": MAX_LENGTH_PENALTY,
        "target_length": 1,
        "weights": dict.fromkeys(("logprob", "fluency", "length", "keywords", "prompt_coverage"), MAX_WEIGHT),
        "step_size": 100,
        "candidates": 2,
    }
    output = "word " * 500
    try:
        with live.client() as client:
            refined = {
                method: client.post(
                    "/refine",
                    json={
                        "inputs": "Hi",
                        "output": output,
                        "parameters": {"refine": {**extreme, "method": method}},
                    },
                )
                for method in ("coordinate", "gradient", "hybrid")
            }
            far_target = client.post(
                "/generate", json=gen("Hi", max_new_tokens=4, refine={"target_length": 100_000})
            )
    finally:
        live.stop()
    for method, r in refined.items():
        assert r.status_code == 200, (method, r.text)
        # The log-probability term still counts: at alpha = 100 the normaliser overflowed and it was 0.
        assert r.json()["refinement"]["objective_before"]["logprob"] < 0, method
    assert far_target.status_code == 200, far_target.text
