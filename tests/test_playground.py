"""The playground page (``GET /``) in a real browser: Debian's chromium driven by Playwright.

Skipped when chromium or the ``playwright`` package is missing (``make test`` installs chromium when it
runs as root). Screenshots are written to ``tests/artifacts/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from refiners.models import LoadedModel
from tests.conftest import LiveServer

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "chromium not installed: apt-get install chromium (or make test as root)", allow_module_level=True
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed: pip install -e '.[dev]'"
)

ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPT = "Write one short sentence that uses all of these words: dog, frisbee, park."
INITIAL = "A happy dog runs around the park on a sunny day."  # "frisbee" is missing
API_KEY = "playground-secret"
RUN_TIMEOUT_MS = 240_000  # the 2-core test machine may be busy with other servers


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., LiveServer], embedded_model: LoadedModel) -> Iterator[LiveServer]:
    live = server_factory(embedded_model)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1000, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(RUN_TIMEOUT_MS)
    yield page
    context.close()


def fill_refine_controls(page: Any, max_new_tokens: str = "8") -> None:
    page.fill("#keywords", "dog, frisbee, park")
    page.fill("#candidates", "4")
    page.fill("#max_new_tokens", max_new_tokens)


def run_and_capture(page: Any, path: str) -> dict[str, Any]:
    """Press Run and return the JSON answer of the API call to ``path`` (non-streaming routes)."""
    with page.expect_response(lambda r: r.url.endswith(path)) as answer:
        page.click("#run")
    page.wait_for_selector("#status:has-text('done')")
    return answer.value.json()


def test_page_is_served_outside_the_openapi_schema(server: LiveServer):
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert client.get("/playground/app.js").status_code == 200
        assert "get" not in client.get("/openapi.json").json()["paths"].get("/", {})


def test_refine_mode_marks_the_inserted_keyword(server: LiveServer, page: Any):
    page.goto(server.url + "/")
    page.check("input[name=mode][value=refine]")
    page.fill("#prompt", PROMPT)
    page.fill("#output", INITIAL)
    fill_refine_controls(page)
    answer = run_and_capture(page, "/refine")
    refinement = answer["refinement"]
    assert "frisbee" in refinement["refined_text"]
    assert page.inner_text("#refined") == refinement["refined_text"]
    assert page.inner_text("#initial") == refinement["initial_text"]
    assert "frisbee" in " ".join(page.locator("#refined ins").all_inner_texts())
    assert page.locator("#edits li").count() == len(refinement["edits"])
    terms = list(refinement["objective_before"])
    assert page.locator("#chart .bar-row").count() == len(terms)
    assert page.locator("#chart .bar.before").count() == len(terms)
    assert page.locator("#chart .bar.after").count() == len(terms)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-refine.png"), full_page=True)
    print(f"screenshot: {ARTIFACTS / 'playground-refine.png'}")


def test_generate_mode_streams_tokens_then_shows_the_refinement(server: LiveServer, page: Any):
    page.goto(server.url + "/")
    page.uncheck("#chat")
    page.fill("#prompt", "The dog and the frisbee")
    fill_refine_controls(page)
    events: list[str] = []
    page.on("response", lambda r: events.append(r.url) if r.url.endswith("/generate_stream") else None)
    page.click("#run")
    page.wait_for_selector("#status:has-text('done')")
    assert events, "the page did not call /generate_stream"
    refined = page.inner_text("#refined")
    assert refined, "no refined text shown"
    assert page.locator("#chart .bar-row").count() >= 1
    edits = page.locator("#edits li").all_inner_texts()
    if page.inner_text("#initial") != refined:
        assert page.locator("#refined ins, #initial del").count() >= 1
    assert len(edits) >= 1  # the edits or "no edits"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-generate.png"), full_page=True)


def test_chat_mode_shows_the_refined_answer(server: LiveServer, page: Any):
    page.goto(server.url + "/")
    page.fill("#prompt", PROMPT)
    fill_refine_controls(page)
    answer = run_and_capture(page, "/v1/chat/completions")
    refinement = answer["choices"][0]["refinement"]
    assert page.inner_text("#refined") == refinement["refined_text"]
    assert page.locator("#chart .bar-row").count() == len(refinement["objective_before"])
    if refinement["edits"]:
        assert page.locator("#refined ins, #initial del").count() >= 1


def test_server_errors_are_shown_in_the_live_region(server: LiveServer, page: Any):
    page.goto(server.url + "/")
    page.fill("#candidates", "0")  # below the schema's minimum: 422
    page.click("#run")
    page.wait_for_selector("#error:not(:empty)")
    assert page.get_attribute("#error", "aria-live") == "assertive"
    assert "validation" in page.inner_text("#error")


def test_narrow_screen_has_no_horizontal_scroll(server: LiveServer, browser: Any):
    context = browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_load_state("networkidle")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-375px.png"), full_page=True)
    context.close()


def test_every_control_has_a_label(server: LiveServer, page: Any):
    page.goto(server.url + "/")
    unlabelled = page.evaluate(
        """[...document.querySelectorAll('input, select, textarea')]
             .filter(el => !el.labels || el.labels.length === 0).map(el => el.id || el.name)"""
    )
    assert unlabelled == []


def test_api_key_is_asked_for_and_sent_as_a_header(
    server_factory: Callable[..., LiveServer], embedded_model: LoadedModel, page: Any
):
    live = server_factory(embedded_model, api_key=API_KEY)
    try:
        assert httpx.get(live.url + "/", timeout=30).status_code == 200  # the page itself is open
        assert httpx.post(live.url + "/", json={"inputs": "hi"}, timeout=30).status_code == 401
        page.goto(live.url + "/")
        page.check("input[name=mode][value=refine]")
        page.fill("#output", INITIAL)
        fill_refine_controls(page)
        page.click("#run")
        page.wait_for_selector("#error:not(:empty)")
        assert page.is_visible("#api_key")
        page.fill("#api_key", API_KEY)
        with page.expect_request(lambda r: r.url.endswith("/refine")) as sent:
            page.click("#run")
        page.wait_for_selector("#status:has-text('done')")
        assert sent.value.headers.get("authorization") == f"Bearer {API_KEY}"
        assert API_KEY not in sent.value.url
        assert page.evaluate("sessionStorage.getItem('refiner_api_key')") == API_KEY
    finally:
        live.stop()
