"""Property-based requests generated from /openapi.json never get a 5xx from the live server.

Served by the tiny random model with small caps so that each generated request is fast.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import LiveServer

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def server(server_factory, tiny_model) -> LiveServer:
    live = server_factory(
        tiny_model,
        max_new_tokens=8,
        default_max_new_tokens=4,
        max_input_tokens=256,
        max_total_tokens=512,
        max_candidates=8,
        refine_default_candidates=4,
        max_best_of=2,
        max_queue=64,
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api_schema(server: LiveServer):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_no_server_errors(api_schema):
    # schemathesis' pytest plugin (from_fixture) does not work with pytest 9, so drive hypothesis
    # directly: one property per operation of the schema, all of them checked, failures collected.
    failures = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def no_5xx(case) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        try:
            no_5xx()
        except Exception as exc:  # keep going: report every failing operation at once
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
