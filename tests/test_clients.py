"""The real clients work against a live server: huggingface_hub, text_generation, openai and httpx."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import LiveServer, sse_events

pytestmark = pytest.mark.integration

PROMPT = "The three primary colors are"
NEW_TOKENS = 6
REFINE = {"candidates": 4}


@pytest.fixture(scope="module")
def server(server_factory, embedded_model) -> LiveServer:
    live = server_factory(embedded_model, refine_default_candidates=4, max_batch_size=4)
    yield live
    live.stop()


@pytest.fixture
def hub_online(monkeypatch):
    """HF_HUB_OFFLINE=1 makes huggingface_hub refuse every URL, even a loopback server: lift it for
    the InferenceClient tests only (nothing here reaches a hub)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    yield
    monkeypatch.undo()
    reset_sessions()


@pytest.fixture(scope="module")
def plain_text(server: LiveServer) -> str:
    """What the prompt gives greedily without refinement (the refined answers start from it)."""
    r = httpx.post(
        f"{server.url}/generate",
        timeout=120,
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, "refine": {"enabled": False}}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"].strip(), "the comparisons below need a non-empty answer"
    return r.json()["generated_text"]


def test_huggingface_hub_text_generation(server: LiveServer, plain_text: str, hub_online):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    text = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS)
    out = client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, details=True)
    assert isinstance(text, str)
    assert out.generated_text == text  # greedy: the same refined answer twice
    assert out.details.generated_tokens == len(out.details.tokens) <= NEW_TOKENS
    assert all(isinstance(t.logprob, float) for t in out.details.tokens)
    refinement = out.details.refinement
    assert refinement["initial_text"] == plain_text
    assert refinement["refined_text"] == text


def test_huggingface_hub_text_generation_stream(server: LiveServer, plain_text: str, hub_online):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    pieces = list(client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, stream=True))
    assert "".join(pieces).replace("<|im_end|>", "") == plain_text  # token texts, EOS included
    events = list(client.text_generation(PROMPT, max_new_tokens=NEW_TOKENS, stream=True, details=True))
    assert len(events) == events[-1].details.generated_tokens
    # The streamed tokens are the initial generation; the final text is the refined one.
    streamed = "".join(e.token.text for e in events if not e.token.special)
    assert streamed == plain_text
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == events[-1].details.refinement["refined_text"]


def test_text_generation_client(server: LiveServer, plain_text: str):
    from text_generation import Client

    client = Client(server.url, timeout=120)
    response = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert response.details.generated_tokens == len(response.details.tokens)
    assert response.details.finish_reason.value in ("length", "eos_token", "stop_sequence")
    stream = list(client.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS))
    assert stream[-1].generated_text == response.generated_text
    assert "".join(s.token.text for s in stream if not s.token.special) == plain_text


def test_openai_completions(server: LiveServer, plain_text: str):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    completion = client.completions.create(
        model="refiner", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, extra_body={"refine": REFINE}
    )
    choice = completion.choices[0]
    refinement = choice.model_extra["refinement"]
    assert refinement["initial_text"] == plain_text
    assert choice.text == refinement["refined_text"]
    assert completion.usage.completion_tokens >= 1

    chunks = list(
        client.completions.create(
            model="refiner",
            prompt=PROMPT,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"refine": REFINE},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == plain_text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices[0].model_extra["refinement"]["refined_text"] == choice.text


def test_openai_chat_completions(server: LiveServer):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "user", "content": "Say hello."}]
    plain = client.chat.completions.create(
        model="refiner",
        messages=messages,
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body={"refine": {"enabled": False}},
    )
    assert plain.choices[0].model_extra["refinement"] is None
    refined = client.chat.completions.create(
        model="refiner",
        messages=messages,
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body={"refine": REFINE},
    )
    refinement = refined.choices[0].model_extra["refinement"]
    assert refinement["initial_text"] == plain.choices[0].message.content
    assert refined.choices[0].message.content == refinement["refined_text"]

    chunks = list(
        client.chat.completions.create(
            model="refiner",
            messages=messages,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"refine": REFINE},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert (
        chunks[-1].choices[0].model_extra["refinement"]["refined_text"] == refined.choices[0].message.content
    )

    models = client.models.list()
    assert [m.id for m in models.data] == ["embedded:smollm2-135m-instruct"]


def test_httpx_generate_stream(server: LiveServer, plain_text: str):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, "refine": REFINE}}
    with (
        httpx.Client(base_url=server.url, timeout=120) as client,
        client.stream("POST", "/generate_stream", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    final = events[-1]
    assert final["details"]["refinement"]["initial_text"] == plain_text
    assert final["generated_text"] == final["details"]["refinement"]["refined_text"]
    assert [e["index"] for e in events] == list(range(len(events)))


@pytest.fixture
def failing_streams(server: LiveServer, monkeypatch):
    """Every stream of the server fails after its first token, as a NaN in the forward pass would."""
    from app.engine import TokenEvent
    from refiners.errors import NumericalError

    def stream(job):
        async def events():
            yield TokenEvent(token_id=job.prompt_ids[-1], logprob=-0.5, text=" the")
            raise NumericalError("the logits became NaN")

        return events()

    monkeypatch.setattr(server.app.state.service.ready.engine, "stream", stream)


def test_a_stream_that_fails_after_its_first_token_ends_with_one_error_event_every_client_raises(
    server: LiveServer, failing_streams, hub_online
):
    import openai
    import text_generation.errors
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import GenerationError

    expected = {"error": "generation failed: the logits became NaN", "error_type": "generation"}
    requests = {
        "/generate_stream": {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS}},
        "/v1/completions": {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "stream": True},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
    }
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for path, body in requests.items():
            with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200, path
                events = sse_events(r.iter_lines())
            # TGI holds each token back until the next one comes: only the error event is left.
            assert events[-1] == expected and expected not in events[:-1], (path, events)

    with pytest.raises(GenerationError, match="logits became NaN"):
        list(
            InferenceClient(base_url=server.url).text_generation(
                PROMPT, max_new_tokens=NEW_TOKENS, stream=True
            )
        )
    with pytest.raises(text_generation.errors.GenerationError, match="logits became NaN"):
        list(
            text_generation.Client(server.url, timeout=120).generate_stream(PROMPT, max_new_tokens=NEW_TOKENS)
        )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    with pytest.raises(openai.APIError) as raised:
        list(client.completions.create(model="refiner", prompt=PROMPT, max_tokens=NEW_TOKENS, stream=True))
    assert "logits became NaN" in str(raised.value.body)
