"""The router's dashboard in a real browser: headless Chromium (the system's, driven by Playwright) against the
real router in front of the suite's TorchServe, after real traffic with feedback. It checks the page's figures
against the report and admin APIs, changes a weight through the page and sees it take effect, sends bad weights
and sees the router's message with nothing changed, and saves screenshots under reports/dashboard/.

Also here: the time series the page draws (`Backend.series`) against a Python reference, on SQLite and on
PostgreSQL."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from router import dashboard, process
from router.config import POSTGRESQL, RouterConfig, StoreSettings
from router.evaluation import MAX_WINDOW_S
from router.report import EVENTS, PERCENTILES, to_markdown
from router.store import Backend, backend_for
from serving import server
from serving.project import REPO
from tests.conftest import encode_image
from tests.postgres import ScratchPostgres
from tests.test_router import Stack, launch, until

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "reports" / "dashboard"
NAME = "dash"
FILE_WEIGHTS = {"full": 2, "pruned": 1, "int8": 1}
EXPERIMENTS: dict[str, Any] = {
    NAME: {"control": "full",
           "arms": {arm: {"model": f"fashion-{arm}", "version": "1.0", "weight": weight}
                    for arm, weight in FILE_WEIGHTS.items()},
           # Every request copied to another version of the full model, compared with whichever arm answered.
           "shadow": {"model": "fashion-full", "version": "2.0", "sample": 1.0}},
}
REQUESTS = 80  # users user-0..79: at least 20 per arm, enough for latency intervals


# --- the time series, both stores -------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        config = RouterConfig(experiments={}, state_dir=tmp_path)
        yield _opened(backend_for(config))
        return
    postgres: ScratchPostgres = request.getfixturevalue("postgres")
    with postgres.database() as url:
        yield _opened(backend_for(RouterConfig(experiments={}, state_dir=tmp_path,
                                               store=StoreSettings(POSTGRESQL, url))))


def _opened(backend: Backend) -> Backend:
    backend.open_writer()
    return backend


def test_the_time_series_equals_a_python_reference(backend: Backend) -> None:
    """Counts per arm and interval (a failed attempt retried elsewhere counts against the arm that failed, as in
    the report) and NumPy's percentiles of each interval's answers; rows before `since`, of another experiment,
    failed or refused by the arm's client are counted or left out as the report does."""
    rng = random.Random(4)
    start, since, step = 1_700_000_000.0, 1_700_000_030.0, 7.5
    rows = []
    for i in range(3000):
        status = rng.choice((200,) * 8 + (400, 503))
        rows.append((f"r{i}", start + i * 0.05, rng.choice(("exp", "exp", "exp", "other")), rng.choice(("a", "a", "b")),
                     "m", None, "rest", status, status < 500, round(rng.lognormvariate(2.5, 0.6), 1), None,
                     rng.choice(("b", "ghost")) if rng.random() < 0.05 else None))
    rows.append(("edge", since + 4 * step, "exp", "a", "m", None, "rest", 200, True, 1.0, None, None))  # a boundary
    try:
        backend.write(rows, [], [], [])
        points = backend.series("exp", since, step, PERCENTILES)
    finally:
        backend.close()
    expected: dict[tuple[str, int], dict[str, Any]] = {}
    for _, at, experiment, arm, _, _, _, status, ok, latency, _, retried_from in rows:
        if experiment != "exp" or at < since:
            continue
        bucket = int((at - since) / step)
        entry = expected.setdefault((arm, bucket), {"requests": 0, "errors": 0, "latencies": []})
        entry["requests"] += 1
        entry["errors"] += 0 if ok else 1
        if ok and status < 400:
            entry["latencies"].append(latency)
        if retried_from:
            origin = expected.setdefault((retried_from, bucket), {"requests": 0, "errors": 0, "latencies": []})
            origin["requests"] += 1
            origin["errors"] += 1
    assert [(p.arm, p.bucket) for p in points] == sorted(expected)
    assert any(p.arm == "a" and p.bucket == 4 for p in points)
    for point in points:
        entry = expected[(point.arm, point.bucket)]
        assert (point.requests, point.errors) == (entry["requests"], entry["errors"])
        for q in PERCENTILES:
            wanted = float(np.percentile(entry["latencies"], q)) if entry["latencies"] else None
            assert point.latency_ms[q] == (None if wanted is None else pytest.approx(wanted, rel=1e-12))


# --- the page in Chromium ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(torchserve: server.Instance, tmp_path_factory: pytest.TempPathFactory, test_images: Any) -> Iterator[Stack]:
    """The router with the dashboard's experiment, after REQUESTS requests with a true label each."""
    launched = launch(torchserve, tmp_path_factory.mktemp("dashboard"), EXPERIMENTS)
    try:
        images, labels = test_images
        for i in range(REQUESTS):
            response = launched.predict(NAME, encode_image(images[i % len(images)]), **{"X-User-Id": f"user-{i}"})
            assert response.status_code == 200, response.text
            feedback = requests.post(f"{launched.url}/feedback", headers=launched.headers(), timeout=10,
                                     json={"request_id": response.headers["X-Request-Id"],
                                           "label": int(labels[i % len(labels)])})
            assert feedback.status_code == 200, feedback.text
        # Shadow copies finish after their answers: the figures settle once each is counted.
        until(lambda: sum(s["compared"] + s["errors"] for s in launched.report(NAME)["shadow"]) == REQUESTS)
        yield launched
    finally:
        process.stop(launched.config_path)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (scripts/check_system.sh does)"
        if os.environ.get("CI"):  # CI ran `make install`, which installs it: a missing browser is a broken setup
            pytest.fail(f"{reason}; CI is set, so the browser tests must run", pytrace=False)
        pytest.skip(reason)  # a dev machine without it: pytest's -ra (pyproject) lists the reason at the end
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    """A fresh tab on the dashboard; any script error on it fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(f"{stack.url}/dashboard")
    try:
        yield tab
    finally:
        context.close()
    assert errors == [], errors


def sign_in(page: Any, token: str) -> None:
    page.fill("#token", token)
    page.click("#login button[type=submit]")


def refreshes(page: Any) -> int:
    return int(page.get_attribute("body", "data-refreshes") or 0)


def refreshed(page: Any, timeout_s: float = 20.0) -> None:
    """Wait until the page has fetched and drawn everything once more."""
    before = refreshes(page)
    deadline = time.monotonic() + timeout_s
    while refreshes(page) <= before:
        assert time.monotonic() < deadline, "the page did not refresh"
        time.sleep(0.1)


def value(page: Any, table: str, arm: str, field: str) -> Any:
    """What a cell of the arms or verdicts table holds (its data-value: a number or object as JSON, or text)."""
    raw = page.get_attribute(f"#{table} tr[data-arm='{arm}'] td[data-field='{field}']", "data-value")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


@pytest.mark.router
def test_the_page_needs_the_admin_token(page: Any, stack: Stack) -> None:
    """The page holds no data; what it shows comes from the admin API, which refuses anyone without the admin
    token. The token never goes into the URL."""
    assert page.is_visible("#login") and not page.is_visible("#board")
    sign_in(page, "not-a-token")
    page.wait_for_selector("#login-error:has-text('missing or invalid admin token')")
    sign_in(page, stack.client_token)
    page.wait_for_selector("#login-error:has-text('needs the admin token, not the client token')")
    assert not page.is_visible("#board")
    sign_in(page, stack.admin_token)
    page.wait_for_selector("body[data-refreshes]")
    assert stack.admin_token not in page.url
    for path in (f"/admin/series/{NAME}", f"/admin/report/{NAME}"):
        assert requests.get(stack.url + path, timeout=10).status_code == 401
    bad = requests.get(f"{stack.url}/admin/series/{NAME}", params={"window_s": 3600, "step_s": 1},
                       headers=stack.admin(), timeout=10)
    assert bad.status_code == 400 and "at most 720" in bad.json()["error"]["message"]
    page.click("#sign-out")
    page.wait_for_selector("#login", state="visible")


@pytest.mark.router
def test_the_page_shows_what_the_report_api_says_and_refreshes_itself(page: Any, stack: Stack,
                                                                        test_images: Any) -> None:
    sign_in(page, stack.admin_token)
    refreshed(page)
    refreshed(page)  # a whole refresh after any shadow row of the fixture's traffic was counted
    report, described = stack.report(NAME), stack.describe()[NAME]
    assert [row["arm"] for row in report["arms"]] == list(FILE_WEIGHTS)
    assert sum(row["requests"] for row in report["arms"]) == REQUESTS
    for row in report["arms"]:
        arm = row["arm"]
        assert value(page, "arms", arm, "weight") == described["arms"][arm]["weight"]
        assert value(page, "arms", arm, "circuit") == described["arms"][arm]["circuit"] == "closed"
        for field in ("requests", "error_rate"):
            assert value(page, "arms", arm, field) == row[field], (arm, field)
        for q in ("p50", "p95", "p99"):
            assert value(page, "arms", arm, q) == row["latency_ms"][q], (arm, q)
        assert value(page, "arms", arm, "latency_vs_control") == row["latency_vs_control"]
        assert (row["latency_vs_control"] is None) == row["control"]  # every candidate has 20 answers or more
        assert value(page, "verdicts", arm, "feedback") == row["feedback"]
        assert value(page, "verdicts", arm, "accuracy") == row["accuracy"]
        shown = page.inner_text(f"#verdicts tr[data-arm='{arm}'] td[data-field='accuracy']")
        assert shown.startswith(f"{row['accuracy'] * 100:.2f}%")
        if row["control"]:
            assert value(page, "verdicts", arm, "verdict") == "control"
        else:
            versus = row["vs_control"]
            assert value(page, "verdicts", arm, "difference") == versus["difference"]
            assert value(page, "verdicts", arm, "verdict") == versus["verdict"] == "too early"  # a few dozen labels
            assert page.inner_text(f"#verdicts tr[data-arm='{arm}'] td[data-field='verdict']") == versus["summary"]
    # The charts hold every request of the window, which holds all of this test's traffic.
    assert int(page.get_attribute("#chart-rate", "data-total-requests") or -1) == REQUESTS
    (shadow,) = report["shadow"]
    shadow_row = f"#shadow tr[data-target='{shadow['target']}']"
    assert json.loads(page.get_attribute(f"{shadow_row} td[data-field='agreement']", "data-value") or "null") == (
        shadow["agreement"])
    assert int(page.get_attribute(f"{shadow_row} td[data-field='compared']", "data-value") or -1) == shadow["compared"]
    coverage = page.inner_text("#coverage")
    assert "in 10 s intervals" in coverage and "the whole request log" in coverage
    assert page.locator("#events li").count() == len(report["events"]) <= EVENTS
    screenshot(page, "dashboard.png")
    (SCREENSHOTS / "report.md").write_text(to_markdown(report))  # the same report, as `python -m router report`

    # More traffic shows up without a reload.
    body = encode_image(test_images[0][5])
    for i in range(3):
        assert stack.predict(NAME, body, **{"X-User-Id": f"later{i}"}).status_code == 200
    total = REQUESTS + 3
    deadline = time.monotonic() + 20
    while sum(int(value(page, "arms", arm, "requests")) for arm in FILE_WEIGHTS) != total:
        assert time.monotonic() < deadline, "the page did not show the new requests"
        time.sleep(0.2)


@pytest.mark.router
def test_a_weight_changed_on_the_page_takes_effect_and_a_bad_one_changes_nothing(page: Any, stack: Stack,
                                                                              test_images: Any) -> None:
    sign_in(page, stack.admin_token)
    page.wait_for_selector("body[data-refreshes]")
    page.fill("input[data-arm='pruned']", "0")
    page.fill("#reason", f"drain pruned from the dashboard {MARKUP}")
    page.click("#apply-weights")
    page.wait_for_selector("#action-message.ok")
    assert page.inner_text("#action-message") == "Applied: full=2, pruned=0, int8=1"
    assert {arm: spec["weight"] for arm, spec in stack.describe()[NAME]["arms"].items()} == {
        "full": 2, "pruned": 0, "int8": 1}
    body = encode_image(test_images[0][6])
    arms = {stack.predict(NAME, body, **{"X-User-Id": f"after{i}"}).headers["X-Arm"] for i in range(12)}
    assert "pruned" not in arms and arms <= {"full", "int8"}
    refreshed(page)
    assert value(page, "arms", "pruned", "weight") == 0
    # The reason, markup and all, is an event's text: shown as typed, never made an element or run.
    assert f"drain pruned from the dashboard {MARKUP}" in page.inner_text("#events")
    assert page.locator("#events img").count() == 0 and page.get_attribute("body", "data-injected") is None
    assert "weight 0" in page.inner_text("#verdicts tr[data-arm='pruned'] td[data-field='verdict']")
    screenshot(page, "weights-applied.png")

    before = stack.describe()[NAME]
    for typed, message in (("-1", "weights.int8: must be a number >= 0, got -1"),
                           ("lots", "weights.int8: must be a number >= 0, got 'lots'")):
        page.fill("input[data-arm='int8']", typed)
        page.click("#apply-weights")
        page.wait_for_selector(f"#action-message.error:has-text(\"{message}\")")
        assert page.inner_text("#action-message") == f"Not applied: {message}"
        assert stack.describe()[NAME] == before
    refreshed(page)
    assert value(page, "arms", "int8", "weight") == 1  # the table shows what the router routes with
    screenshot(page, "bad-weight.png")

    page.click("#reset")
    page.wait_for_selector("#action-message.ok:has-text('Back to the experiment file')")
    assert {arm: spec["weight"] for arm, spec in stack.describe()[NAME]["arms"].items()} == FILE_WEIGHTS
    refreshed(page)
    assert page.input_value("input[data-arm='int8']") == "1" and page.input_value("input[data-arm='pruned']") == "1"


MARKUP = "<img src=x onerror=\"document.body.dataset.injected='yes'\">"
# Counts what the page has scheduled and has under way: the refresh loop's timers and its fetches.
WATCH = """(() => {
  const pending = new Set();
  const set = window.setTimeout.bind(window);
  const clear = window.clearTimeout.bind(window);
  window.setTimeout = (callback, ms, ...args) => {
    const id = set(() => { pending.delete(id); callback(...args); }, ms);
    pending.add(id);
    return id;
  };
  window.clearTimeout = (id) => { pending.delete(id); clear(id); };
  let inFlight = 0;
  const fetched = window.fetch.bind(window);
  window.fetch = async (...args) => {
    inFlight += 1;
    try { return await fetched(...args); } finally { inFlight -= 1; }
  };
  window.watched = () => ({ timers: pending.size, inFlight });
})();"""


def settled(page: Any, timeout_s: float = 20.0) -> dict[str, int]:
    """What the page has scheduled once none of its fetches is under way (each refresh's drawing included)."""
    deadline = time.monotonic() + timeout_s
    while True:
        watched: dict[str, int] = page.evaluate("window.watched()")
        if watched["inFlight"] == 0:
            time.sleep(0.2)  # the refresh's code after its last fetch runs in the next tasks
            again: dict[str, int] = page.evaluate("window.watched()")
            if again["inFlight"] == 0:
                return again
        assert time.monotonic() < deadline, "the page's fetches did not finish"
        time.sleep(0.1)


@pytest.mark.router
def test_one_refresh_loop_draws_the_latest_choice_and_stops_at_sign_out(page: Any, stack: Stack) -> None:
    """Windows chosen while refreshes are under way leave one refresh loop, which draws the last choice; a
    sign-out while a refresh is under way leaves none, and no call goes out without the token."""
    page.add_init_script(WATCH)
    page.reload()  # the watch in place before the page's own script
    sign_in(page, stack.admin_token)
    page.wait_for_selector("body[data-refreshes]")
    authorizations: list[str | None] = []
    page.on("request", lambda request: authorizations.append(request.headers.get("authorization"))
            if "/admin/" in request.url else None)
    # Three choices at once: each starts a refresh while the earlier ones are under way.
    page.evaluate("""() => {
      const select = document.getElementById("traffic-window");
      for (const choice of ["300:10", "3600:60", "900:30"]) {
        select.value = choice;
        select.dispatchEvent(new Event("change"));
      }
    }""")
    assert settled(page)["timers"] == 1
    assert "in 30 s intervals" in page.inner_text("#coverage")
    # A sign-out while a refresh is under way.
    page.evaluate("""() => {
      document.getElementById("traffic-window").dispatchEvent(new Event("change"));
      document.getElementById("sign-out").click();
    }""")
    assert settled(page)["timers"] == 0
    assert page.is_visible("#login") and page.inner_text("#login-error") == ""
    assert authorizations and all(header == f"Bearer {stack.admin_token}" for header in authorizations)


@pytest.mark.router
def test_the_page_is_served_with_a_strict_content_security_policy(stack: Stack) -> None:
    """No inline script, no script from elsewhere, nothing fetched but this router: injected markup could not
    run even if some text were ever inserted as markup."""
    for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        response = requests.get(stack.url + path, timeout=10)
        assert response.status_code == 200
        policy = {directive.split()[0]: directive.split()[1:]
                  for directive in response.headers["Content-Security-Policy"].split(";") if directive.strip()}
        assert policy["default-src"] == ["'none'"]
        for directive in ("script-src", "style-src", "connect-src"):
            assert policy[directive] == ["'self'"], directive
        assert policy["frame-ancestors"] == ["'none'"] and response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Security-Policy"] == dashboard.HEADERS["Content-Security-Policy"]


@pytest.mark.router
def test_bad_series_and_report_parameters_get_a_clear_400(stack: Stack) -> None:
    """Each says what is wrong, at the cost of parsing it: no query runs, no huge number is printed."""
    url = f"{stack.url}/admin/series/{NAME}"
    step_rule = f"step_s must be at least 1 and window_s from step_s to {MAX_WINDOW_S:g}"
    for params, status, message in (
            ({"window_s": 3600, "step_s": 1}, 400, "at most 720"),
            ({"window_s": "nan"}, 400, f"{step_rule} (got step_s 10, window_s nan)"),
            ({"step_s": "inf"}, 400, f"{step_rule} (got step_s inf, window_s 300)"),
            ({"window_s": "abc"}, 400, "window_s must be a number of seconds, got 'abc'"),
            ({"step_s": 0.5}, 400, f"{step_rule} (got step_s 0.5, window_s 300)"),
            ({"window_s": -300}, 400, f"{step_rule} (got step_s 10, window_s -300)"),
            ({"window_s": 1e10, "step_s": 2e7}, 400, f"{step_rule} (got step_s 2e+07, window_s 1e+10)"),
            ({"window_s": 1e308, "step_s": 10}, 400, f"{step_rule} (got step_s 10, window_s 1e+308)")):
        response = requests.get(url, params=params, headers=stack.admin(), timeout=10)
        assert response.status_code == status, (params, response.text)
        assert message in response.json()["error"]["message"], (params, response.text)
    unknown = requests.get(f"{stack.url}/admin/series/nope", headers=stack.admin(), timeout=10)
    assert unknown.status_code == 404 and "no experiment 'nope'" in unknown.json()["error"]["message"]
    assert requests.get(url, params={"window_s": 600, "step_s": 600}, headers=stack.admin(), timeout=10).ok
    report = f"{stack.url}/admin/report/{NAME}"
    for params, message in (({"since_s": "nan"}, "since_s must be a finite number of seconds >= 0, got nan"),
                            ({"since_s": "-5"}, "since_s must be a finite number of seconds >= 0, got -5"),
                            ({"max_age_s": "61"}, "max_age_s must be from 0 to 60 seconds, got 61"),
                            ({"max_age_s": "soon"}, "max_age_s must be a number of seconds, got 'soon'")):
        response = requests.get(report, params=params, headers=stack.admin(), timeout=10)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


@pytest.mark.router
def test_callers_that_accept_an_older_report_share_one(stack: Stack, test_images: Any) -> None:
    """With max_age_s (the dashboard sends its refresh period) the router hands out the report it made last if
    it is young enough; without, or once the weights change, a new one with every row so far."""
    url, admin = f"{stack.url}/admin/report/{NAME}", stack.admin()

    def total(**params: Any) -> int:
        response = requests.get(url, params=params, headers=admin, timeout=30)
        assert response.status_code == 200, response.text
        return sum(row["requests"] for row in response.json()["arms"])

    before = total()
    assert stack.predict(NAME, encode_image(test_images[0][7]), **{"X-User-Id": "cached"}).status_code == 200
    assert total(max_age_s=60) == before  # the last report, made before that request
    assert total() == before + 1  # a new one
    assert total(max_age_s=60) == before + 1  # which is now the last
    weights = {arm: spec["weight"] for arm, spec in stack.describe()[NAME]["arms"].items()}
    assert stack.predict(NAME, encode_image(test_images[0][8]), **{"X-User-Id": "cached2"}).status_code == 200
    changed = requests.put(f"{stack.url}/admin/experiments/{NAME}/weights", headers=admin, timeout=10,
                           json={"weights": {**weights, "int8": 3}, "reason": "cache test"})
    assert changed.status_code == 200, changed.text
    try:
        assert total(max_age_s=60) == before + 2  # other weights: not the report made with the old ones
    finally:
        assert requests.delete(f"{stack.url}/admin/experiments/{NAME}/override", headers=admin, timeout=10).ok
