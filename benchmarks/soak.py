"""Soak benchmark: a long mixed load on a running server; does it stay answerable, bounded and at rest?

For ``--duration`` seconds, ``--concurrency`` clients (one httpx async client, loopback only) each send
one request after another, drawn from a weighted mix of five kinds:

- ``small``: ``POST /generate``, a short prompt, 8 new tokens, default refinement (half of them with
  1-2 ``refine.keywords``);
- ``maximal``: the largest request the schema and ``GET /info`` allow, to ``POST /generate`` or
  ``POST /refine``: a prompt of ``max_input_tokens`` tokens ("The dog ran. " repeated, cut by
  ``truncate``), the most new tokens (or the longest output) that fit, the hybrid method at the most
  steps, ``max_candidates`` candidates, ``max_keywords`` keywords of the longest allowed text, and the
  prompt-coverage term weighted. A 422 saying it costs too much, or a 503/429 with Retry-After, is a
  proper answer;
- ``large``: a large request the server admits at its default refinement: a ``max_input_tokens`` prompt,
  ``max_keywords`` short keywords and half the most new tokens that fit alone (the first refusal names
  how many); it runs alone, small requests run in its pauses, and one that could not finish behind the
  work queued gets 429;
- ``cancelled``: the client gives up: a ``POST /generate`` with a 0.5-2 s client timeout, or a
  ``POST /generate_stream`` closed after its first event;
- ``invalid``: malformed JSON, wrong types, unknown fields, unknown objective terms: a 4xx is expected.

Meanwhile the server's resident memory (VmRSS) is sampled. When the time is up the clients finish the
request they are in (each bounded by ``--request-timeout``), the server is left to become idle and
``GET /metrics`` is scraped for ``refiner_requests_in_flight`` and ``refiner_queue_size``. Reported:
requests by kind and status, the failures (5xx other than 503 with Retry-After, invalid requests not
answered with a 4xx, requests with no answer that the client did not give up on purpose), small-request
p50/p95 latency, memory at start, peak and end, and the gauges at rest. The target lines are printed;
the exit code is 0 whether they are met or not (a measurement), 1 only when the server died or stopped
answering (the measurement is incomplete).

    python -m benchmarks.soak --duration 1800 --concurrency 16            # make bench-soak
    python -m benchmarks.soak --duration 60 --mix small=1 --out /tmp/soak.json
    python -m benchmarks.soak --url http://127.0.0.1:8080 --pid 12345     # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.report import RESULTS_DIR, Column, markdown_table, percentile, write_json
from refiners.config import MAX_CANDIDATES, MAX_KEYWORDS, MAX_STEPS

KINDS = ("small", "large", "maximal", "cancelled", "invalid")
DEFAULT_MIX = "small=0.6,large=0.03,maximal=0.12,cancelled=0.15,invalid=0.1"
SENTENCE = "The dog ran. "
KEYWORD_MAX_CHARS = 1000  # app.schemas' NonEmptyStr; used only when /openapi.json does not say
# A 422 of a maximal request whose message says one of these is the cost budget refusing it
# (app.admission: "this request would need about 336 s of work ..."); any other 422 means the request
# was not schema-valid after all, which the operator should see.
COST_WORDS = ("would need", "cost", "budget", "memory", "expensive")
IN_FLIGHT, QUEUE_SIZE = "refiner_requests_in_flight", "refiner_queue_size"
REJECTED = "refiner_rejected_requests_total"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MIB = 1024 * 1024


@dataclass
class Record:
    """One request: its kind and variant, when it started (s after the soak began), how long it took,
    the HTTP status (None: no answer, ``error`` names the transport error), whether a Retry-After
    came, whether the client gave up on purpose, and the error message of a 4xx/5xx answer."""

    kind: str
    variant: str
    latency_s: float
    status: int | None = None
    error: str | None = None
    retry_after: bool = False
    cancelled: bool = False
    message: str | None = None
    at_s: float = 0.0

    @property
    def failed_5xx(self) -> bool:
        """A server error that is not the overload answer (503 with Retry-After)."""
        return (
            self.status is not None and self.status >= 500 and not (self.status == 503 and self.retry_after)
        )

    @property
    def unanswered(self) -> bool:
        """No HTTP answer, and not because the client gave up on purpose."""
        return self.status is None and not self.cancelled

    @property
    def outcome(self) -> str:
        """The status code, ``"cancelled"`` or the transport error's name: what a table counts."""
        if self.status is not None:
            return str(self.status) + (" (closed after 1st event)" if self.cancelled else "")
        return "cancelled" if self.cancelled else self.error or "no answer"


@dataclass(frozen=True)
class Limits:
    """What the largest valid request may ask for, read from ``GET /info`` and ``/openapi.json``;
    ``tokens_per_sentence`` (tokens each ``SENTENCE`` adds to a text) is measured on the server."""

    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int
    max_candidates: int
    max_keywords: int
    max_steps: int
    keyword_chars: int
    tokens_per_sentence: float

    @property
    def output_tokens(self) -> int:
        """New tokens (or /refine output tokens) that fit after a prompt of ``max_input_tokens``."""
        return max(1, min(self.max_new_tokens, self.max_total_tokens - self.max_input_tokens))


@dataclass(frozen=True)
class SoakOptions:
    """How the soak runs, apart from what it sends.

    Args:
        request_timeout_s: a request not answered within this is recorded as unanswered.
        idle_timeout_s: how long to wait, once the clients are done, for the server to be at rest.
        sample_interval_s: seconds between resident-memory samples and liveness checks.
        progress_s: seconds between progress lines (None: quiet).
        seed: of the clients' random choices (client i uses ``seed * 1000 + i``).
    """

    request_timeout_s: float = 300.0
    idle_timeout_s: float = 120.0
    sample_interval_s: float = 1.0
    progress_s: float | None = 60.0
    seed: int = 0


def parse_mix(text: str) -> dict[str, float]:
    """``"small=0.6,maximal=0.15"`` -> ``{"small": 0.6, "maximal": 0.15, "cancelled": 0.0, ...}``.

    Weights are relative (they need not sum to 1); kinds left out get 0.
    """
    mix = dict.fromkeys(KINDS, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in KINDS:
            raise ValueError(f"mix entry {part!r}: write kind=weight, kind one of {', '.join(KINDS)}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"mix entry {part!r}: the weight must be a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"mix entry {part!r}: the weight must be finite and >= 0")
        mix[name] = weight
    if not any(mix.values()):
        raise ValueError(f"mix {text!r}: give at least one kind a weight above 0")
    return mix


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory (VmRSS) of a process, bytes. Raises OSError when the process is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"process {pid} has no VmRSS (a zombie?)")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


# -- reading the server -----------------------------------------------------------------------------


def _bound(prop: Mapping[str, Any], key: str) -> int | None:
    """A bound (``maximum``, ``maxItems``, ...) of an OpenAPI property, looking inside ``anyOf``."""
    for option in [prop, *prop.get("anyOf", [])]:
        if key in option:
            return int(option[key])
    return None


async def _prefill_tokens(http: httpx.AsyncClient, text: str) -> int:
    """How many tokens the server makes of ``text`` as a prompt (its prefill, one token generated)."""
    body = {
        "inputs": text,
        "parameters": {"max_new_tokens": 1, "decoder_input_details": True, "refine": {"enabled": False}},
    }
    response = (await http.post("/generate", json=body)).raise_for_status()
    return len(response.json()["details"]["prefill"])


async def read_limits(http: httpx.AsyncClient) -> Limits:
    """Token caps, candidates and keywords from ``/info``; steps and keyword length (schema constants)
    from ``/openapi.json``; tokens per ``SENTENCE`` from the prefill of 8 and 16 of them."""
    info = (await http.get("/info")).raise_for_status().json()
    openapi = await http.get("/openapi.json")
    schemas = openapi.json().get("components", {}).get("schemas", {}) if openapi.status_code == 200 else {}
    props = schemas.get("RefineParameters", {}).get("properties", {})
    keywords = props.get("keywords", {})
    defaults = info["refine_defaults"]
    short, long = await _prefill_tokens(http, SENTENCE * 8), await _prefill_tokens(http, SENTENCE * 16)
    return Limits(
        max_input_tokens=info["max_input_tokens"],
        max_total_tokens=info["max_total_tokens"],
        max_new_tokens=info["max_new_tokens"],
        max_candidates=min(
            defaults["max_candidates"], _bound(props.get("candidates", {}), "maximum") or MAX_CANDIDATES
        ),
        max_keywords=min(defaults["max_keywords"], _bound(keywords, "maxItems") or MAX_KEYWORDS),
        max_steps=_bound(props.get("steps", {}), "maximum") or MAX_STEPS,
        keyword_chars=_bound(keywords.get("items", {}), "maxLength") or KEYWORD_MAX_CHARS,
        tokens_per_sentence=max(1.0, (long - short) / 8),
    )


def gauges_of(metrics_text: str) -> dict[str, float]:
    """The at-rest readings of a ``/metrics`` text: in-flight requests, queue size, rejections by reason."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in (IN_FLIGHT, QUEUE_SIZE):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
            elif sample.name == REJECTED:
                out[f"rejected_{sample.labels.get('reason', '')}"] = sample.value
    return out


async def wait_idle(http: httpx.AsyncClient, timeout_s: float) -> dict[str, Any]:
    """Scrape ``/metrics`` until no request but the scrape itself is in flight and the queue is empty,
    or ``timeout_s`` passes. Returns the last readings, whether the server got idle and how long it took."""
    started = time.monotonic()
    while True:
        readings: dict[str, Any]
        try:
            readings = gauges_of((await http.get("/metrics", timeout=10)).raise_for_status().text)
        except httpx.HTTPError as exc:
            readings = {"scrape_error": type(exc).__name__}
        idle = readings.get(IN_FLIGHT, math.inf) <= 1 and readings.get(QUEUE_SIZE, math.inf) == 0
        waited = time.monotonic() - started
        if idle or waited >= timeout_s:
            return {**readings, "idle": idle, "idle_wait_s": waited}
        await asyncio.sleep(0.5)


# -- the four kinds of request ----------------------------------------------------------------------


class RequestKind(Protocol):
    """One kind of request of the mix: ``send`` makes one (its variant drawn with ``rng``) and records
    what came back."""

    name: str

    async def send(self, http: httpx.AsyncClient, rng: random.Random) -> Record: ...


async def _timed(kind: str, variant: str, send: Callable[[], Any], cancel_on_timeout: bool = False) -> Record:
    """Await ``send()`` (an httpx request) and record its answer, or its transport error; a timeout
    is the client giving up on purpose when ``cancel_on_timeout``."""
    started = time.perf_counter()
    try:
        response: httpx.Response = await send()
    except httpx.TimeoutException as exc:
        return Record(
            kind,
            variant,
            time.perf_counter() - started,
            error=type(exc).__name__,
            cancelled=cancel_on_timeout,
        )
    except httpx.HTTPError as exc:
        return Record(kind, variant, time.perf_counter() - started, error=type(exc).__name__)
    return _answered(kind, variant, time.perf_counter() - started, response)


def _answered(
    kind: str, variant: str, latency_s: float, response: httpx.Response, cancelled: bool = False
) -> Record:
    message = None
    if response.status_code >= 400:
        try:
            message = str(response.json().get("error"))[:300]
        except (ValueError, AttributeError):
            message = response.text[:300]
    return Record(
        kind,
        variant,
        latency_s,
        status=response.status_code,
        retry_after="retry-after" in response.headers,
        cancelled=cancelled,
        message=message,
    )


class SmallRequests:
    """``POST /generate`` with a short prompt and 8 new tokens, default refinement; half of them ask
    for 1-2 keywords."""

    name = "small"
    PROMPTS = (
        "Write a sentence about a dog.",
        "Name a colour of the sky.",
        "Say something about rain.",
        "Describe a quiet morning.",
        "What do cats like?",
    )
    KEYWORDS = ("dog", "park", "river", "ball", "sun", "tree")

    async def send(self, http: httpx.AsyncClient, rng: random.Random) -> Record:
        parameters: dict[str, Any] = {"max_new_tokens": 8}
        variant = "plain"
        if rng.random() < 0.5:
            parameters["refine"] = {"keywords": rng.sample(self.KEYWORDS, rng.randint(1, 2))}
            variant = "keywords"
        body = {"inputs": rng.choice(self.PROMPTS), "parameters": parameters}
        return await _timed(self.name, variant, lambda: http.post("/generate", json=body))


class MaximalRequests:
    """The largest valid request, to ``/generate`` or ``/refine`` (see the module docstring).

    Its bodies are built once from the server's ``Limits``. A 422 that does not read as a cost
    refusal (``COST_WORDS``) is printed once per message: the request was meant to be schema-valid.
    """

    name = "maximal"

    def __init__(self, limits: Limits) -> None:
        sentences = math.ceil(limits.max_input_tokens / limits.tokens_per_sentence) + 4
        prompt = SENTENCE * sentences  # more tokens than allowed: ``truncate`` keeps the last ones
        refine = {
            "method": "hybrid",
            "steps": limits.max_steps,
            "candidates": limits.max_candidates,
            "keywords": [self._keyword(i, limits.keyword_chars) for i in range(limits.max_keywords)],
            "weights": {"prompt_coverage": 1.0},
        }
        truncate = limits.max_input_tokens
        # Two tokens of margin: a sentence's tokens may merge differently at the text's edges.
        output_sentences = max(1, int((limits.output_tokens - 2) / limits.tokens_per_sentence))
        self.bodies = {
            "/generate": {
                "inputs": prompt,
                "parameters": {
                    "max_new_tokens": limits.output_tokens,
                    "truncate": truncate,
                    "refine": refine,
                },
            },
            "/refine": {
                "inputs": prompt,
                "output": (SENTENCE * output_sentences).strip(),
                "parameters": {"truncate": truncate, "refine": refine},
            },
        }
        self.reported: set[str] = set()

    @staticmethod
    def _keyword(i: int, chars: int) -> str:
        text = f"keyword {i} " + "a long phrase about the dog that ran across the green field " * 20
        return text[:chars].strip()

    async def send(self, http: httpx.AsyncClient, rng: random.Random) -> Record:
        route = rng.choice(sorted(self.bodies))
        body = self.bodies[route]
        record = await _timed(self.name, route, lambda: http.post(route, json=body))
        message = record.message or ""
        if record.status == 422 and not any(w in message.lower() for w in COST_WORDS):
            if message not in self.reported:
                self.reported.add(message)
                print(f"maximal {route}: refused as invalid, not as too costly (422): {message}", flush=True)
        return record


class LargeRequests:
    """``POST /generate`` as large as the server admits with its default refinement settings."""

    name = "large"

    def __init__(self, limits: Limits) -> None:
        sentences = math.ceil(limits.max_input_tokens / limits.tokens_per_sentence) + 4
        self.body = {
            "inputs": SENTENCE * sentences,
            "parameters": {
                "max_new_tokens": limits.output_tokens,
                "truncate": limits.max_input_tokens,
                "refine": {"keywords": [f"word{i} here" for i in range(limits.max_keywords)]},
            },
        }

    async def send(self, http: httpx.AsyncClient, rng: random.Random) -> Record:
        record = await _timed(self.name, "/generate", lambda: http.post("/generate", json=self.body))
        # Over the cost budget: the refusal names the most new tokens that fit alone. Ask for half of
        # that from now on: a request sized to the whole budget could never wait behind other work.
        fits = re.search(r"max_new_tokens to (\d+)", record.message or "") if record.status == 422 else None
        if fits:
            self.body["parameters"]["max_new_tokens"] = max(1, int(fits.group(1)) // 2)
        return record


class CancelledRequests:
    """Clients that give up: ``POST /generate`` of a longer answer with a 0.5-2 s client timeout, or
    ``POST /generate_stream`` closed after its first event."""

    name = "cancelled"
    # Long enough to outlast the client's patience under load, short enough for the cost budget to
    # admit it (a refused request tests nothing about cancellation).
    NEW_TOKENS = 64

    def __init__(self, limits: Limits) -> None:
        tokens = min(limits.max_new_tokens, self.NEW_TOKENS, limits.max_total_tokens - 32)
        self.body = {
            "inputs": "Tell me a long story about a dog.",
            "parameters": {"max_new_tokens": max(1, tokens)},
        }

    async def send(self, http: httpx.AsyncClient, rng: random.Random) -> Record:
        if rng.random() < 0.5:
            timeout = httpx.Timeout(rng.uniform(0.5, 2.0))
            return await _timed(
                self.name, "timeout", lambda: http.post("/generate", json=self.body, timeout=timeout), True
            )
        return await self._stream_first_event(http)

    async def _stream_first_event(self, http: httpx.AsyncClient) -> Record:
        started = time.perf_counter()
        try:
            async with http.stream("POST", "/generate_stream", json=self.body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return _answered(self.name, "stream", time.perf_counter() - started, response)
                got_event = False
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        got_event = True
                        break  # leaving the block closes the connection mid-stream
                latency = time.perf_counter() - started
                return _answered(self.name, "stream", latency, response, cancelled=got_event)
        except httpx.HTTPError as exc:
            return Record(self.name, "stream", time.perf_counter() - started, error=type(exc).__name__)


class InvalidRequests:
    """Requests the schema must refuse with a 4xx."""

    name = "invalid"
    BODIES: dict[str, tuple[str, dict[str, Any]]] = {
        "wrong types": ("/generate", {"inputs": 42, "parameters": {"max_new_tokens": "eight"}}),
        "unknown field": ("/generate", {"inputs": "Hello", "parameters": {"refine": {"colour": "blue"}}}),
        "out of range": ("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": -1}}),
        "unknown term": (
            "/generate",
            {"inputs": "Hello", "parameters": {"refine": {"weights": {"nope": 1}}}},
        ),
        "missing output": ("/refine", {"inputs": "Hello"}),
    }
    MALFORMED = b'{"inputs": "Hello", "parameters": {'

    async def send(self, http: httpx.AsyncClient, rng: random.Random) -> Record:
        variant = rng.choice(["malformed JSON", *self.BODIES])
        if variant == "malformed JSON":
            headers = {"content-type": "application/json"}
            return await _timed(
                self.name, variant, lambda: http.post("/generate", content=self.MALFORMED, headers=headers)
            )
        route, body = self.BODIES[variant]
        return await _timed(self.name, variant, lambda: http.post(route, json=body))


# -- the soak ---------------------------------------------------------------------------------------


class Soak:
    """One soak run: the clients, the memory sampler and the liveness watch, sharing their records.

    Args:
        http: the client, ``base_url`` the server.
        kinds: the request kinds by name, with their relative weights in ``mix``.
        rss_of: the server's resident memory in bytes (None: not measured; OSError: process gone).
        alive: whether the server process still runs (None: only a refused connection tells).
        options: timeouts, sampling and seed.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        kinds: Mapping[str, RequestKind],
        mix: Mapping[str, float],
        rss_of: Callable[[], int] | None,
        alive: Callable[[], bool] | None,
        options: SoakOptions,
    ) -> None:
        self.http, self.kinds, self.options = http, kinds, options
        self.names = [k for k in kinds if mix.get(k, 0) > 0]
        self.weights = [mix[k] for k in self.names]
        self.rss_of, self.alive = rss_of, alive
        self.records: list[Record] = []
        self.memory: list[tuple[float, float]] = []  # (s since start, MiB)
        self.died: str | None = None
        self.in_flight = 0  # requests sent and not yet answered: lost if the server dies
        self.dead = asyncio.Event()
        self.start = time.monotonic()
        self.seen: set[tuple[str, str]] = set()

    def sample_memory(self) -> None:
        if self.rss_of is None:
            return
        try:
            self.memory.append((time.monotonic() - self.start, self.rss_of() / MIB))
        except OSError:
            self._declare_dead("its process is gone (no /proc status)")

    def _declare_dead(self, why: str) -> None:
        if self.died is None:
            self.died = f"{why} ({self.in_flight} requests in flight)"
            print(f"SERVER DIED after {time.monotonic() - self.start:.0f} s: {self.died}", flush=True)
        self.dead.set()

    async def client(self, i: int, deadline: float) -> None:
        rng = random.Random(self.options.seed * 1000 + i)
        while time.monotonic() < deadline and not self.dead.is_set():
            kind = rng.choices(self.names, self.weights)[0]
            at = time.monotonic() - self.start
            self.in_flight += 1
            record = await self.kinds[kind].send(self.http, rng)
            self.in_flight -= 1
            record.at_s = at
            self.records.append(record)
            self._note(record)

    def _note(self, record: Record) -> None:
        """Print the first of each kind of failure, and stop when nothing listens any more."""
        if record.error == "ConnectError":  # on loopback: nothing listens on the port
            self._declare_dead("connection refused")
        if (record.failed_5xx or record.unanswered) and not self.dead.is_set():
            what = record.outcome + (f": {record.message}" if record.message else "")
            if (record.kind, what) not in self.seen:
                self.seen.add((record.kind, what))
                print(f"{record.kind} {record.variant}: {what}", flush=True)

    async def watch(self) -> None:
        """Sample memory and check the server is alive every ``sample_interval_s``; print progress."""
        last_progress = time.monotonic()
        while not self.dead.is_set():
            if self.alive is not None and not self.alive():
                self._declare_dead("the server process exited")
            self.sample_memory()
            progress = self.options.progress_s
            if progress is not None and time.monotonic() - last_progress >= progress:
                last_progress = time.monotonic()
                self.print_progress()
            await asyncio.sleep(self.options.sample_interval_s)

    def print_progress(self) -> None:
        failures = sum(r.failed_5xx for r in self.records)
        rss = f"{self.memory[-1][1]:.0f} MiB" if self.memory else "-"
        print(
            f"soak: {time.monotonic() - self.start:.0f} s, {len(self.records)} requests, "
            f"{failures} 5xx (not 503+Retry-After), server RSS {rss}",
            flush=True,
        )

    async def run(self, duration_s: float, concurrency: int) -> None:
        """Run the clients until ``duration_s`` has passed and each has finished its request, or until
        the server dies (then the clients are cancelled at once)."""
        self.sample_memory()
        deadline = time.monotonic() + duration_s
        watcher = asyncio.ensure_future(self.watch())
        clients = asyncio.ensure_future(
            asyncio.gather(*(self.client(i, deadline) for i in range(concurrency)))
        )
        # Read the clients' outcome even when the run is torn down from outside (SIGTERM, Ctrl-C),
        # so asyncio does not log it as "never retrieved".
        clients.add_done_callback(lambda f: f.cancelled() or f.exception())
        died = asyncio.ensure_future(self.dead.wait())
        await asyncio.wait([clients, died], return_when=asyncio.FIRST_COMPLETED)
        for task in (clients, watcher, died):
            task.cancel()
        await asyncio.gather(clients, watcher, died, return_exceptions=True)


def summarize(soak: Soak, rest: Mapping[str, Any]) -> dict[str, Any]:
    """Counts by kind and outcome, the failure counts, small-request latency, memory and the gauges."""
    records = soak.records
    by_kind = {}
    for kind in KINDS:
        mine = [r for r in records if r.kind == kind]
        by_kind[kind] = {
            "sent": len(mine),
            "outcomes": dict(sorted(Counter(r.outcome for r in mine).items())),
            "client_cancelled": sum(r.cancelled for r in mine),
            "failed_5xx": sum(r.failed_5xx for r in mine),
            "unanswered": sum(r.unanswered for r in mine),
        }
    small_ok = [1000 * r.latency_s for r in records if r.kind == "small" and r.status == 200]
    mib = [m for _, m in soak.memory]
    return {
        "requests": len(records),
        "by_kind": by_kind,
        "failed_5xx": sum(r.failed_5xx for r in records),
        "status_503_with_retry_after": sum(r.status == 503 and r.retry_after for r in records),
        "status_503_without_retry_after": sum(r.status == 503 and not r.retry_after for r in records),
        "status_429": sum(r.status == 429 for r in records),
        "invalid_not_4xx": sum(
            r.kind == "invalid" and not (r.status is not None and 400 <= r.status < 500) for r in records
        ),
        "unanswered": sum(r.unanswered for r in records),
        "small_ok": len(small_ok),
        "small_p50_ms": percentile(small_ok, 50),
        "small_p95_ms": percentile(small_ok, 95),
        "rss_start_mib": mib[0] if mib else math.nan,
        "rss_peak_mib": max(mib) if mib else math.nan,
        "rss_final_mib": mib[-1] if mib else math.nan,
        "server_died": soak.died,
        "at_rest": dict(rest),
        "requests_in_flight_at_rest": rest.get(IN_FLIGHT, math.nan),
        "queue_size_at_rest": rest.get(QUEUE_SIZE, math.nan),
    }


def _target(target: str, value: Any, goal: str, met: bool) -> dict[str, Any]:
    return {"target": target, "value": value, "goal": goal, "met": met}


def targets(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The target lines: what was measured, the goal, and whether it was met."""
    s = summary
    in_flight, queue = s["requests_in_flight_at_rest"], s["queue_size_at_rest"]
    return [
        _target("server alive to the end", s["server_died"] or "yes", "yes", s["server_died"] is None),
        _target("5xx other than 503 with Retry-After", s["failed_5xx"], "0", s["failed_5xx"] == 0),
        _target(
            "invalid requests not answered with a 4xx", s["invalid_not_4xx"], "0", s["invalid_not_4xx"] == 0
        ),
        _target(
            "requests with no answer (not cancelled on purpose)", s["unanswered"], "0", s["unanswered"] == 0
        ),
        _target("requests in flight at rest (the scrape counts itself)", in_flight, "<= 1", in_flight <= 1),
        _target("queue size at rest", queue, "0", queue == 0),
    ]


async def _run_soak(
    url: str,
    duration_s: float,
    concurrency: int,
    mix: Mapping[str, float],
    rss_of: Callable[[], int] | None,
    alive: Callable[[], bool] | None,
    options: SoakOptions,
) -> dict[str, Any]:
    pool = httpx.Limits(max_connections=2 * concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(
        base_url=url, timeout=options.request_timeout_s, limits=pool, trust_env=False
    ) as http:
        limits = await read_limits(http)
        maximal = MaximalRequests(limits)
        kinds: dict[str, RequestKind] = {
            k.name: k
            for k in (
                SmallRequests(),
                LargeRequests(limits),
                maximal,
                CancelledRequests(limits),
                InvalidRequests(),
            )
        }
        soak = Soak(http, kinds, mix, rss_of, alive, options)
        await soak.run(duration_s, concurrency)
        rest: dict[str, Any] = {}
        if soak.died is None:
            rest = await wait_idle(http, options.idle_timeout_s)
            soak.sample_memory()
        wall = time.monotonic() - soak.start
    summary = summarize(soak, rest)
    summary["wall_s"] = wall
    return {
        "settings": {
            "duration_s": duration_s,
            "concurrency": concurrency,
            "mix": dict(mix),
            **asdict(options),
        },
        "limits": asdict(limits),
        "maximal_unexpected_422": sorted(maximal.reported),
        "summary": summary,
        "targets": targets(summary),
        "memory_mib": [[round(t, 1), round(m, 1)] for t, m in soak.memory],
        "records": [asdict(r) for r in soak.records],
    }


def run_soak(
    url: str,
    duration_s: float,
    concurrency: int,
    mix: Mapping[str, float],
    rss_of: Callable[[], int] | None,
    alive: Callable[[], bool] | None = None,
    options: SoakOptions | None = None,
) -> dict[str, Any]:
    """Soak the server at ``url`` (loopback) for ``duration_s`` with ``concurrency`` clients.

    Args:
        mix: relative weight of each kind in ``KINDS`` (see ``parse_mix``).
        rss_of: the server's resident memory, bytes (``rss_bytes(pid)``); None: not measured.
        alive: whether the server process runs; checked every ``options.sample_interval_s``.
        options: timeouts, sampling and seed (``SoakOptions()`` when None).

    Returns:
        ``settings``, ``limits`` (what the maximal request asked for), ``summary`` (see
        ``summarize``), ``targets``, ``memory_mib`` samples ``[s, MiB]`` and every request's record.
    """
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"{url}: the soak only talks to a server on loopback ({', '.join(LOOPBACK)})")
    return asyncio.run(_run_soak(url, duration_s, concurrency, mix, rss_of, alive, options or SoakOptions()))


# -- report and command line ------------------------------------------------------------------------

KIND_TABLE = [
    Column("kind", "kind"),
    Column("sent", "sent"),
    Column("outcomes", "outcomes (status: count)"),
    Column("client_cancelled", "cancelled by client"),
    Column("failed_5xx", "5xx (not 503+RA)"),
    Column("unanswered", "no answer"),
]
TARGET_TABLE = [
    Column("target", "target"),
    Column("value", "value"),
    Column("goal", "goal"),
    Column("met", ""),
]
MEASURE_TABLE = [Column("measure", "measure"), Column("value", "value")]


def _number(value: float) -> str:
    """Counts as integers, measures with one decimal, NaN (not measured) as "-"."""
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def report(result: Mapping[str, Any]) -> str:
    """The printed report: requests by kind, the measures, and the target lines."""
    s = result["summary"]
    kind_rows = [
        {**row, "kind": kind, "outcomes": ", ".join(f"{k}: {v}" for k, v in row["outcomes"].items())}
        for kind, row in s["by_kind"].items()
    ]
    measures = [
        {"measure": "small p50 latency (ms, 200 answers)", "value": s["small_p50_ms"]},
        {"measure": "small p95 latency (ms, 200 answers)", "value": s["small_p95_ms"]},
        {"measure": "503 with Retry-After", "value": s["status_503_with_retry_after"]},
        {"measure": "503 without Retry-After", "value": s["status_503_without_retry_after"]},
        {"measure": "429", "value": s["status_429"]},
        {"measure": "server RSS at start (MiB)", "value": s["rss_start_mib"]},
        {"measure": "server RSS peak (MiB)", "value": s["rss_peak_mib"]},
        {"measure": "server RSS at the end (MiB)", "value": s["rss_final_mib"]},
        {"measure": "wall time (s)", "value": s["wall_s"]},
    ]
    target_rows = [{**t, "met": "MET" if t["met"] else "MISSED"} for t in result["targets"]]
    return "\n\n".join(
        [
            markdown_table(kind_rows, KIND_TABLE),
            markdown_table([{**m, "value": _number(m["value"])} for m in measures], MEASURE_TABLE),
            "Targets:\n" + markdown_table(target_rows, TARGET_TABLE),
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load (default 1800)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default 16)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"kind=weight,... (default {DEFAULT_MIX})")
    parser.add_argument("--url", help="soak this server (loopback) instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--model", help="the started server's --model (default: the embedded model)")
    parser.add_argument("--device", default="auto", help="the started server's --device (default auto)")
    parser.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds before a request counts as unanswered"
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=120.0, help="seconds to wait for the server to be at rest"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mix = parse_mix(args.mix)
    options = SoakOptions(
        request_timeout_s=args.request_timeout, idle_timeout_s=args.idle_timeout, seed=args.seed
    )
    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
        alive = (lambda: pid_alive(pid)) if pid else None
    else:
        from benchmarks.speed import ServerProcess  # REFINER_* settings pass through its environment

        server = ServerProcess({}, model=args.model, device=args.device)
        url, pid = server.url, server.proc.pid

        def alive() -> bool:
            return server.proc.poll() is None

    rss_of = (lambda: rss_bytes(pid)) if pid else None
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server started here is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if server is not None:
            server.wait_ready()
        print(f"soak: {args.duration:.0f} s, {args.concurrency} clients, {url}, mix {mix}", flush=True)
        result = run_soak(url, args.duration, args.concurrency, mix, rss_of, alive, options)
        if server is not None:
            code = server.proc.poll()
            result["server"] = {
                "model": args.model or "embedded",
                "exit_code": code,
                "log_tail": server.output(),
            }
    finally:
        if server is not None:
            server.stop()
    print(report(result))
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    died = result["summary"]["server_died"]
    if died:
        log = (
            result.get("server", {}).get("log_tail", "(not started by the soak: see its own log)")
            or "(empty)"
        )
        print(f"\nTHE SERVER DIED ({died}); the measurement is incomplete. Its log ends with:\n{log}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
