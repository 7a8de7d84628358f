"""The review page in a real browser: headless Chromium (Debian's package) driven by Selenium.

The service runs on a loopback port (werkzeug, threaded); the decisions on
screen are made by real exchanges over HTTP (tests/support/review_support.py).  The test
checks what a person sees: a sign-in wall with nothing behind it, then the
timeline of those decisions, a filter that narrows it, an identity with its
baseline and signals, charts and the service graph drawn as SVG, and markup in
a record shown as text (no script runs).  Screenshots of each view are written
to the test's directory, and to ``$STS_REVIEW_SCREENSHOTS`` when set (that is how
``docs/screenshots/`` is made).

Chromium and chromedriver are not optional: ``.ci/run`` installs them
(``apt-get install chromium chromium-driver``), and without them this test fails.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait
from werkzeug.serving import make_server

from sts.app import create_app
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.support.clock import Clock
from tests.support.review_support import (
    APP,
    PASSWORD,
    REPORTS,
    REPORTS_JOB,
    REVIEWER,
    make_decisions,
    review_policy,
    review_settings,
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    web = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    web.set_page_load_timeout(30)
    try:
        yield web
    finally:
        web.quit()


@pytest.fixture
def service(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The service on a loopback port, after the scenario's exchanges went to it over HTTP."""
    holder: dict[str, Any] = {}
    server = make_server("127.0.0.1", 0, lambda env, start: holder["app"](env, start), threaded=True)
    base = f"http://127.0.0.1:{server.server_port}"
    clock = Clock(float(int(time.time())))
    issuers = [{"name": "upstream", "issuer": upstream.issuer.issuer_url, "jwks_uri": upstream.jwks_uri,
                "algorithms": ["RS256"], "audiences": [base], "max_token_age": 3600}]  # fmt: skip
    settings = make_settings(review_policy(), issuer=base, issuers=issuers, **review_settings())
    holder["app"] = create_app(settings, clock=clock)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with requests.Session() as http:

            def post(form: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
                response = http.post(f"{base}/token", data=form, headers=headers, timeout=10)
                return response.status_code, response.json()

            made = make_decisions(post, upstream.issuer, clock, audience=base)
        yield base, made
    finally:
        server.shutdown()
        thread.join(5)


def shoot(web: WebDriver, name: str, directory: Path) -> None:
    """The whole page (up to 1,800 pixels high), then the window as it was."""
    height = int(web.execute_script("return document.documentElement.scrollHeight"))
    web.set_window_size(1280, max(900, min(height, 1800)))
    try:
        web.save_screenshot(str(directory / f"{name}.png"))
        extra = os.environ.get("STS_REVIEW_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            web.save_screenshot(str(Path(extra) / f"{name}.png"))
    finally:
        web.set_window_size(1280, 900)


def texts(web: WebDriver, css: str) -> list[str]:
    return [e.text for e in web.find_elements(By.CSS_SELECTOR, css)]


def svg_texts(web: WebDriver, css: str) -> list[str]:
    # SVG text content (WebElement.text is empty for SVG text in some drivers).
    return [str(e.get_attribute("textContent")).strip() for e in web.find_elements(By.CSS_SELECTOR, css)]


def test_a_reviewer_signs_in_and_reads_the_decisions(
    browser: WebDriver, service: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    base, made = service
    wait = WebDriverWait(browser, 15)

    # 1. The wall: a sign-in form and nothing else, wherever one goes.
    for path in ("/review/", "/review/timeline", f"/review/identity?issuer=upstream&subject={REPORTS_JOB}"):
        browser.get(base + path)
        assert browser.title.startswith("Sign in")
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "Sign in to review decisions" in page
        assert APP not in page and "granted" not in page and "refused" not in page
        assert browser.find_elements(By.CSS_SELECTOR, "svg, table") == []
    browser.get(base + "/review/")
    shoot(browser, "login", tmp_path)
    browser.find_element(By.NAME, "username").send_keys(REVIEWER)
    browser.find_element(By.NAME, "password").send_keys("not the password")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait.until(lambda w: w.find_elements(By.CSS_SELECTOR, ".problem"))
    assert "Unknown user or wrong password." in browser.find_element(By.CSS_SELECTOR, ".problem").text
    browser.find_element(By.NAME, "username").send_keys(REVIEWER)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()

    # 2. The overview: both charts drawn, with the outcomes and signals of the exchanges.
    wait.until(lambda w: w.find_elements(By.ID, "outcomes-chart"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Decisions, last 24h"
    assert browser.find_elements(By.CSS_SELECTOR, "#outcomes-chart rect.granted")
    assert browser.find_elements(By.CSS_SELECTOR, "#outcomes-chart rect.refused")
    assert {"unusual_network", "elevated_privilege", "attestation_drift"} <= set(
        svg_texts(browser, "#signals-chart text.name tspan")
    )
    assert "sts audit verify" in browser.find_element(By.ID, "chain-status").text
    shoot(browser, "overview", tmp_path)

    # 3. The timeline lists every decision the exchanges made; markup in a record stays text.
    browser.find_element(By.LINK_TEXT, "Timeline").click()
    wait.until(lambda w: w.find_elements(By.CSS_SELECTOR, "tr.decision"))
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.decision")
    assert len(rows) == made["decisions"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.decision.granted")) == made["granted"]
    assert any('<img src=x onerror="alert(1)">' in r.text for r in rows)
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - raises when no alert is open
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    shoot(browser, "timeline", tmp_path)

    # 4. A filter narrows it: refusals only, then the step-up among them.
    Select(browser.find_element(By.NAME, "outcome")).select_by_visible_text("refused")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait.until(lambda w: "outcome=refused" in w.current_url)
    refused = browser.find_elements(By.CSS_SELECTOR, "tr.decision")
    assert len(refused) == made["refused"] and all("refused" in r.get_attribute("class") for r in refused)
    Select(browser.find_element(By.NAME, "signal")).select_by_visible_text("elevated_privilege")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    wait.until(lambda w: "signal=elevated_privilege" in w.current_url)
    (step_up,) = browser.find_elements(By.CSS_SELECTOR, "tr.decision")
    assert "insufficient_user_authentication" in step_up.text

    # 5. The identity: its baseline, recent signals, step-ups and tokens.
    step_up.find_element(By.CSS_SELECTOR, "a.identity").click()
    wait.until(lambda w: w.find_elements(By.ID, "baseline"))
    assert browser.find_element(By.TAG_NAME, "h1").text == f"upstream / {APP}"
    baseline = browser.find_element(By.ID, "baseline").text
    assert "count 7" in baseline and "10.1.2.0/24" in baseline and "github-hosted" in baseline
    assert "unusual_network" in browser.find_element(By.ID, "signals").text
    assert "elevated_privilege" in browser.find_element(By.ID, "step-ups").text
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens tbody tr")
    assert len(tokens) == 7 and all("https://deploy.example.com" in t.text for t in tokens)
    shoot(browser, "identity", tmp_path)

    # 6. The graph: both edges, the reports job's marked new.
    browser.find_element(By.LINK_TEXT, "Service graph").click()
    wait.until(lambda w: w.find_elements(By.ID, "edge-graph"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#edge-graph path.edge")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#edge-graph path.edge.new")) == 1
    labels = svg_texts(browser, "#edge-graph text tspan")
    assert f"upstream / {REPORTS_JOB}" in labels and REPORTS in labels and "new" in labels
    shoot(browser, "graph", tmp_path)

    # 7. Signing out closes the door again.
    browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait.until(lambda w: w.title.startswith("Sign in"))
    browser.get(base + "/review/timeline")
    assert browser.find_elements(By.CSS_SELECTOR, "tr.decision") == []
    assert all(
        (tmp_path / f"{n}.png").stat().st_size > 1000 for n in ("overview", "timeline", "identity", "graph")
    )
