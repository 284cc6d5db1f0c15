"""A short soak (``benchmarks.soak``): 18 s of mixed load, concurrency 8, on the tiny random model.

The server runs in this process (a real uvicorn on loopback), so the memory sampled is the test
process's own. Its token and refinement limits (which the soak's maximal request reads from
``GET /info``) and its cost budget are lowered so that the run drains in seconds on the 2-core test
machine. The properties checked are the soak's targets: no server error but overload, invalid
requests refused with a 4xx, every request answered unless its client gave up, and nothing left in
flight or queued at rest.
"""

from __future__ import annotations

import pytest

from benchmarks.soak import DEFAULT_MIX, KINDS, SoakOptions, parse_mix, report, rss_bytes, run_soak
from tests.conftest import LiveServer

DURATION_S = 18.0
CONCURRENCY = 8
LIMITS = {
    "max_input_tokens": 128,
    "max_total_tokens": 192,
    "max_new_tokens": 64,
    "max_candidates": 16,
    "max_keywords": 4,
}
# The cost budget admits requests of at most 30 s of estimated work. The server's time limit (240 s)
# stays below the client's (300 s): a request the server cannot finish gets its 504 (a failure the test
# reports) instead of a client-side timeout. The limit is roomy because the soak's clients run in the
# server's own process, where they compete with its worker for the GIL: this test checks answers, not
# latency (benchmarks/soak.py measures that, with the server in its own process).
BUDGET = {"max_request_work_s": 30.0, "request_timeout_s": 240.0}


@pytest.fixture(scope="module")
def server(server_factory, tiny_model) -> LiveServer:
    live = server_factory(tiny_model, **LIMITS, **BUDGET)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def result(server: LiveServer) -> dict:
    options = SoakOptions(request_timeout_s=300.0, idle_timeout_s=240.0, progress_s=None)
    return run_soak(
        server.url,
        DURATION_S,
        CONCURRENCY,
        parse_mix(DEFAULT_MIX),
        rss_bytes,
        server.thread.is_alive,
        options,
    )


def test_every_kind_of_request_was_sent(result: dict):
    sent = {kind: row["sent"] for kind, row in result["summary"]["by_kind"].items()}
    assert all(sent[kind] > 0 for kind in KINDS), sent
    assert result["summary"]["by_kind"]["cancelled"]["client_cancelled"] > 0  # the server saw clients leave
    assert result["summary"]["server_died"] is None


def test_no_server_error_other_than_overload(result: dict):
    s = result["summary"]
    failures = [r for r in result["records"] if r["status"] is not None and r["status"] >= 500]
    assert s["failed_5xx"] == 0, failures[:5]
    assert s["status_503_without_retry_after"] == 0


def test_every_invalid_request_gets_a_4xx(result: dict):
    invalid = [r for r in result["records"] if r["kind"] == "invalid"]
    assert invalid
    assert all(r["status"] is not None and 400 <= r["status"] < 500 for r in invalid), invalid
    assert result["summary"]["invalid_not_4xx"] == 0


def test_every_request_is_answered_unless_its_client_gave_up(result: dict):
    unanswered = [r for r in result["records"] if r["status"] is None and not r["cancelled"]]
    assert unanswered == [] and result["summary"]["unanswered"] == 0


def test_maximal_request_is_schema_valid(result: dict):
    # A 422 of the maximal request may only be the cost budget refusing it.
    assert result["maximal_unexpected_422"] == []
    assert result["limits"]["max_candidates"] == LIMITS["max_candidates"]


def test_server_is_at_rest_afterwards(result: dict):
    s = result["summary"]
    assert s["at_rest"]["idle"], s["at_rest"]
    assert s["requests_in_flight_at_rest"] <= 1  # the /metrics scrape is itself in flight
    assert s["queue_size_at_rest"] == 0
    assert all(t["met"] for t in result["targets"]), result["targets"]


def test_memory_is_sampled_from_start_to_end(result: dict):
    s = result["summary"]
    assert 0 < s["rss_start_mib"] <= s["rss_peak_mib"]
    assert 0 < s["rss_final_mib"] <= s["rss_peak_mib"]
    assert len(result["memory_mib"]) >= DURATION_S / 2


def test_report_prints_every_kind_and_target_line(result: dict):
    text = report(result)
    assert all(f"| {kind} " in text for kind in KINDS)
    assert text.count("| MET ") == len(result["targets"]) and "MISSED" not in text


def test_mix_parsing_names_the_mistake():
    assert parse_mix("small=3,invalid=1") == {
        "small": 3.0,
        "large": 0.0,
        "maximal": 0.0,
        "cancelled": 0.0,
        "invalid": 1.0,
    }
    for bad, words in (
        ("huge=1", "kind one of"),
        ("small=x", "number"),
        ("small=-1", ">= 0"),
        ("small=0", "above 0"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_mix(bad)
