"""Generation by another inference engine: the HTTP clients of the upstream generator.

With ``REFINER_GENERATOR=<protocol>:<url>`` the initial output of a request comes from an engine the
deployment already runs, and the local model only refines it (``app.upstream_jobs``). One class per
protocol says what to send and how to read the answer, behind one small interface:

- ``generate(prompt, params) -> UpstreamOutput``: the whole output, its finish reason and the seconds
  the upstream took;
- ``stream(prompt, params)``: the output's text pieces as the upstream sends them (``UpstreamPiece``),
  then its ``UpstreamOutput``;
- ``probe()``: whether the upstream answers (``/health``, ``/ready``).

``OpenAICompletions`` speaks the completions API of vLLM, SGLang, llama.cpp's ``llama-server``,
``llama-cpp-python`` and Refiner itself (``openai:http://host:port/v1``); ``TGIGenerate`` speaks
text-generation-inference's ``/generate`` and ``/generate_stream`` (``tgi:http://host:port``).

Every client has one ``httpx.AsyncClient`` (one connection pool, with limits) and a semaphore that
bounds the requests in flight (``generator_max_concurrency``). Every failure is raised as one
``app.errors.UpstreamError`` (refused or reset connection, timeout, 4xx, 5xx, an unreadable answer),
which the HTTP layer answers with a JSON error and which ``refiner_upstream_errors_total`` counts by kind.

Example (inside a coroutine):
    >>> client = upstream_client(Settings(generator="openai:http://127.0.0.1:8000/v1"))
    >>> out = await client.generate("The sky is", SamplingParams(max_new_tokens=8))
    >>> out.text, out.finish_reason, out.seconds
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from app import metrics
from app.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.settings import Settings
from refiners.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SamplingParams

# /health and /ready wait at most this for the upstream: below Kubernetes' default probe timeout (1 s),
# so a hung upstream never fails Refiner's own probes by making them slow.
PROBE_TIMEOUT_S = 0.8
# Connections beyond the generation requests' share of the pool, so that probes are not queued behind them.
PROBE_CONNECTIONS = 2
# Upstream error messages are cut to this many characters (an HTML error page can be long).
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class UpstreamOutput:
    """What the upstream generated: the text, why it stopped (``length`` | ``eos_token`` |
    ``stop_sequence``), the seed it sampled with (None when greedy or not known) and the seconds from
    sending the request to the last byte of the answer."""

    text: str
    finish_reason: str
    seed: int | None
    seconds: float


@dataclass(frozen=True)
class UpstreamPiece:
    """One streamed piece of the output: the text it adds and, when the upstream says, its log-probability."""

    text: str
    logprob: float | None = None


@dataclass
class _StreamState:
    """What a stream has said so far; ``text`` is the upstream's full text when it sends one."""

    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int | None = None
    text: str | None = None


def _get(data: Any, path: tuple[str | int, ...], kind: type | tuple[type, ...]) -> Any:
    """``data[path[0]][path[1]]...``, which must be a ``kind``; else ``UpstreamMalformed``."""
    value = data
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    if not isinstance(value, kind):
        where = ".".join(map(str, path))
        raise UpstreamMalformed(f"the upstream generator's answer has no valid {where}: {str(data)[:200]}")
    return value


def _json(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        raise UpstreamMalformed(f"the upstream generator's answer is not JSON: {text[:200]!r}") from None


def _error_message(body: bytes) -> str:
    """The message of an error answer: TGI's ``error``, OpenAI's ``error.message``, vLLM's older
    ``message``, FastAPI's ``detail``, or the body's text."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        for value in (error.get("message") if isinstance(error, dict) else error, data.get("message")):
            if isinstance(value, str) and value:
                return value[:MAX_MESSAGE_CHARS]
        if "detail" in data:
            return str(data["detail"])[:MAX_MESSAGE_CHARS]
    return body.decode(errors="replace").strip()[:MAX_MESSAGE_CHARS] or "(empty body)"


class UpstreamClient:
    """The upstream generator over HTTP: one connection pool, at most ``max_concurrency`` requests at once.

    Subclasses (one per protocol) set the paths and implement ``body``, ``read_answer`` and ``read_event``.

    Args:
        url: the server's base URL (``http://host:port/v1`` for OpenAI, ``http://host:port`` for TGI).
        timeout_s: longest wait to connect, for the answer, for each streamed event and for a free slot.
        max_concurrency: requests in flight at once; more wait for a slot.
        retry_after_s: the Retry-After sent with 502/503 answers when the upstream sent none.
        model: the ``model`` field sent to an OpenAI upstream; None leaves it out.
    """

    protocol: ClassVar[str]
    generate_path: ClassVar[str]
    stream_path: ClassVar[str]
    probe_path: ClassVar[str]

    def __init__(
        self,
        url: str,
        timeout_s: float,
        max_concurrency: int,
        retry_after_s: int = 1,
        model: str | None = None,
    ) -> None:
        if timeout_s <= 0 or max_concurrency < 1:
            raise ValueError("timeout_s must be > 0 and max_concurrency >= 1")
        self.url, self.timeout_s, self.retry_after_s, self.model = (
            url.rstrip("/"),
            timeout_s,
            retry_after_s,
            model,
        )
        limits = httpx.Limits(
            max_connections=max_concurrency + PROBE_CONNECTIONS, max_keepalive_connections=max_concurrency
        )
        self._http = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s), limits=limits)
        self._slots = asyncio.Semaphore(max_concurrency)

    @property
    def name(self) -> str:
        """The generator as configured: ``<protocol>:<url>``."""
        return f"{self.protocol}:{self.url}"

    # -- the protocol ---------------------------------------------------------------------------------

    def body(self, prompt: str, params: SamplingParams, stream: bool) -> dict[str, Any]:
        """The JSON request for ``prompt`` generated with ``params``."""
        raise NotImplementedError

    def read_answer(self, answer: Any, params: SamplingParams) -> tuple[str, str, int | None]:
        """(text, finish reason, seed) of a whole answer; ``UpstreamMalformed`` when it is not one."""
        raise NotImplementedError

    def read_event(self, data: Any, params: SamplingParams, state: _StreamState) -> UpstreamPiece | None:
        """Read one streamed event into ``state``; the piece of text it adds, if any."""
        raise NotImplementedError

    # -- requests -------------------------------------------------------------------------------------

    async def generate(self, prompt: str, params: SamplingParams) -> UpstreamOutput:
        """The upstream's output for ``prompt``. Raises an ``UpstreamError`` on any failure."""
        async with self._guard(), self._slot():
            started = time.monotonic()
            response = await self._http.post(self.generate_path, json=self.body(prompt, params, False))
            self._check(response)
            text, finish_reason, seed = self.read_answer(_json(response.content), params)
            seconds = time.monotonic() - started
        metrics.UPSTREAM_REQUEST_DURATION.observe(seconds)
        return UpstreamOutput(text, finish_reason, seed, seconds)

    async def stream(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[UpstreamPiece | UpstreamOutput]:
        """The output's pieces as the upstream streams them, then the whole ``UpstreamOutput``.
        Closing the iterator early closes the upstream connection (the upstream then stops)."""
        state = _StreamState()
        async with self._guard(), self._slot():
            started = time.monotonic()
            body = self.body(prompt, params, True)
            async with self._http.stream("POST", self.stream_path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check(response)
                async for line in response.aiter_lines():
                    data = line[len("data:") :].strip() if line.startswith("data:") else ""
                    if data == "[DONE]":
                        break
                    if data and (piece := self.read_event(_json(data), params, state)) is not None:
                        yield piece
            if state.finish_reason is None:
                raise UpstreamMalformed("the upstream generator's stream ended without a finish reason")
            seconds = time.monotonic() - started
        metrics.UPSTREAM_REQUEST_DURATION.observe(seconds)
        text = state.text if state.text is not None else "".join(state.pieces)
        yield UpstreamOutput(text, state.finish_reason, state.seed, seconds)

    async def probe(self) -> str | None:
        """None when the upstream answers ``probe_path`` with 2xx within ``PROBE_TIMEOUT_S``; else why not."""
        try:
            response = await self._http.get(self.probe_path, timeout=PROBE_TIMEOUT_S)
        except httpx.TimeoutException:
            return f"no answer from {self.url}{self.probe_path} within {PROBE_TIMEOUT_S:g} s"
        except httpx.HTTPError as exc:
            return f"{self.url}{self.probe_path}: {type(exc).__name__}: {exc}"
        if response.is_success:
            return None
        return (
            f"{self.url}{self.probe_path} answered {response.status_code}: {_error_message(response.content)}"
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamTimeout(
                f"no request to the upstream generator finished within {self.timeout_s:g} s to free a slot "
                "(generator_max_concurrency requests in flight): retry later"
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Turn transport failures into ``UpstreamError``s and count every ``UpstreamError`` by kind."""
        try:
            try:
                yield
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout(
                    f"the upstream generator {self.url} did not answer within {self.timeout_s:g} s "
                    f"({type(exc).__name__})"
                ) from exc
            except httpx.TransportError as exc:
                raise UpstreamUnreachable(
                    f"the upstream generator {self.url} cannot be reached ({type(exc).__name__}: {exc}): "
                    "retry later"
                ) from exc
        except UpstreamError as exc:
            metrics.UPSTREAM_ERRORS.labels(kind=exc.kind).inc()
            raise

    def _check(self, response: httpx.Response) -> None:
        """Raise for an error status: 4xx passes through with its message, 5xx becomes 502 (503 stays 503)."""
        status = response.status_code
        if status < 400:
            return
        message = _error_message(response.content)
        upstream_retry = response.headers.get("Retry-After")
        retry = int(upstream_retry) if upstream_retry and upstream_retry.isdigit() else None
        if status < 500:
            raise UpstreamRejected(f"the upstream generator refused the request: {message}", status, retry)
        raise UpstreamError(
            f"the upstream generator failed (HTTP {status}): {message}",
            503 if status == 503 else 502,
            retry if retry is not None else self.retry_after_s,
        )


class OpenAICompletions(UpstreamClient):
    """The OpenAI completions API (``POST /v1/completions``) of vLLM, SGLang, llama.cpp and others."""

    protocol = "openai"
    generate_path = stream_path = "/completions"
    probe_path = "/models"

    def body(self, prompt: str, params: SamplingParams, stream: bool) -> dict[str, Any]:
        penalty = params.repetition_penalty if params.repetition_penalty is not None else 1.0
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature if params.do_sample else 0.0,  # 0: greedy everywhere
            "stream": stream,
            # vLLM's and SGLang's name for it; llama.cpp calls it repeat_penalty and defaults it to 1.1,
            # not to "none", so both are sent (servers ignore fields they do not know).
            "repetition_penalty": penalty,
            "repeat_penalty": penalty,
            # vLLM and SGLang then keep a matched stop sequence in the text, as TGI and Refiner do.
            "include_stop_str_in_output": True,
        }
        if params.do_sample and params.top_p is not None:
            body["top_p"] = params.top_p
        if params.do_sample and params.top_k is not None:
            body["top_k"] = params.top_k
        optional = {"model": self.model, "seed": params.seed, "stop": list(params.stop) or None}
        return body | {k: v for k, v in optional.items() if v is not None}

    def read_answer(self, answer: Any, params: SamplingParams) -> tuple[str, str, int | None]:
        choice = _get(answer, ("choices", 0), dict)
        text = _get(choice, ("text",), str)
        reason = self._finish_reason(choice, text, params)
        if reason is None:
            raise UpstreamMalformed(
                f"the upstream generator's answer has no finish_reason: {str(answer)[:200]}"
            )
        return text, reason, params.seed

    def read_event(self, data: Any, params: SamplingParams, state: _StreamState) -> UpstreamPiece | None:
        if isinstance(data, dict) and "error" in data:
            message = _error_message(json.dumps(data).encode())
            raise UpstreamError(f"the upstream generator failed during the stream: {message}")
        choices = _get(data, ("choices",), list)
        if not choices:  # a usage chunk
            return None
        text = _get(choices, (0, "text"), str)
        state.pieces.append(text)
        state.seed = params.seed
        state.finish_reason = (
            self._finish_reason(choices[0], "".join(state.pieces), params) or state.finish_reason
        )
        return UpstreamPiece(text) if text else None

    @staticmethod
    def _finish_reason(choice: dict[str, Any], text: str, params: SamplingParams) -> str | None:
        """OpenAI's ``length`` / ``stop`` as TGI's ``length`` / ``stop_sequence`` / ``eos_token``: a stop
        sequence matched when vLLM's ``stop_reason`` names it or the text ends with one."""
        reason = choice.get("finish_reason")
        if reason is None:
            return None
        if reason == "length":
            return FINISH_LENGTH
        if reason != "stop":  # vLLM's "abort", a content filter: not an output to refine
            raise UpstreamError(f"the upstream generator ended the output with finish_reason {reason!r}")
        matched = isinstance(choice.get("stop_reason"), str) or any(text.endswith(s) for s in params.stop)
        return FINISH_STOP if matched else FINISH_EOS


class TGIGenerate(UpstreamClient):
    """text-generation-inference's ``POST /generate`` and ``POST /generate_stream``."""

    protocol = "tgi"
    generate_path = "/generate"
    stream_path = "/generate_stream"
    probe_path = "/health"
    FINISH_REASONS: ClassVar[tuple[str, ...]] = (FINISH_LENGTH, FINISH_EOS, FINISH_STOP)

    def body(self, prompt: str, params: SamplingParams, stream: bool) -> dict[str, Any]:
        parameters: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": params.do_sample,
            "details": True,
            "stop": list(params.stop),
        }
        if params.do_sample:  # TGI refuses a temperature of 0 and a top_p of 1
            parameters["temperature"] = params.temperature
            if params.top_p is not None and params.top_p < 1.0:
                parameters["top_p"] = params.top_p
            if params.top_k is not None:
                parameters["top_k"] = params.top_k
        optional = {"seed": params.seed, "repetition_penalty": params.repetition_penalty}
        return {
            "inputs": prompt,
            "parameters": parameters | {k: v for k, v in optional.items() if v is not None},
        }

    def read_answer(self, answer: Any, params: SamplingParams) -> tuple[str, str, int | None]:
        text = _get(answer, ("generated_text",), str)
        return text, self._finish_reason(answer), self._seed(answer, params)

    def read_event(self, data: Any, params: SamplingParams, state: _StreamState) -> UpstreamPiece | None:
        if isinstance(data, dict) and "error" in data:
            raise UpstreamError(f"the upstream generator failed during the stream: {data['error']}")
        token = _get(data, ("token",), dict)
        if data.get("generated_text") is not None:  # the last event
            state.text = _get(data, ("generated_text",), str)
            state.finish_reason = self._finish_reason(data)
            state.seed = self._seed(data, params)
        if token.get("special"):  # EOS: its text is not part of the output
            return None
        text = _get(token, ("text",), str)
        logprob = token.get("logprob")
        state.pieces.append(text)
        return UpstreamPiece(text, float(logprob) if isinstance(logprob, int | float) else None)

    def _finish_reason(self, answer: Any) -> str:
        reason = _get(answer, ("details", "finish_reason"), str)
        if reason not in self.FINISH_REASONS:
            raise UpstreamMalformed(f"the upstream generator's finish_reason {reason!r} is not a TGI one")
        return reason

    @staticmethod
    def _seed(answer: Any, params: SamplingParams) -> int | None:
        seed = answer.get("details", {}).get("seed") if isinstance(answer.get("details"), dict) else None
        return seed if isinstance(seed, int) else params.seed


PROTOCOLS: dict[str, type[UpstreamClient]] = {"openai": OpenAICompletions, "tgi": TGIGenerate}


def upstream_client(settings: Settings) -> UpstreamClient | None:
    """The client of ``settings.generator`` (``<protocol>:<url>``); None when generation is local."""
    if settings.generator is None:
        return None
    protocol, _, url = settings.generator.partition(":")
    return PROTOCOLS[protocol](
        url,
        timeout_s=settings.generator_timeout_s,
        max_concurrency=settings.generator_max_concurrency,
        retry_after_s=settings.retry_after_s,
        model=settings.generator_model,
    )
