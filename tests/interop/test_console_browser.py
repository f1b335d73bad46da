"""
The web console in a real browser: Debian's headless Chromium driven by Playwright,
against a real engine process and a real ``iii-sdk`` 0.10.0 worker (console_scene.py).

Playwright is installed with the test extra on CPython only (it has no PyPy wheels):
on PyPy these tests skip, and run in the CPython pass. Without /usr/bin/chromium they
skip on a developer's machine (``apt-get install chromium`` runs them) and fail in CI.
"""

import os
import platform

import pytest

CHROMIUM = "/usr/bin/chromium"
PAGES = ("overview", "workers", "functions", "triggers", "traces", "logs", "queues",
         "state", "streams")
TIMEOUT_MS = 15000

if platform.python_implementation() != "CPython":
    pytest.skip("the browser tests run in the CPython pass (Playwright has no PyPy build)",
                allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("playwright is not installed: pip install -e '.[test]'",
                allow_module_level=True)
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI must install Debian's chromium (.ci/run does)")
    pytest.skip("no {}: apt-get install chromium to run the browser tests".format(CHROMIUM),
                allow_module_level=True)

from console_scene import HOSTILE, OPS_TOKEN, VIEWER_TOKEN, Scene  # noqa: E402
from engine_process import wait_until  # noqa: E402


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    scene = Scene(tmp_path_factory.mktemp("console")).start()
    scene.fill()
    yield scene
    scene.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


def _new_page(browser):
    """
    @return: (a fresh browser context, its page), the page's console errors collected
        in C{page.errors}.
    """
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    return context, page


@pytest.fixture
def page(browser, scene):
    """A fresh browser context on the console; its console errors are collected."""
    context, page = _new_page(browser)
    # A window.alert/confirm would mean injected script ran: fail loudly.
    page.on("dialog", lambda d: (page.errors.append("dialog: " + d.message), d.dismiss()))
    yield page
    context.close()


def open_page(page, scene, name):
    page.goto(scene.console_url + "#" + name)
    expect(page.locator("nav a.active")).to_have_attribute("data-page", name)
    # The first push replaced the placeholder.
    expect(page.locator("#live > .notice", has_text="loading")).to_have_count(0)


def test_every_page_loads_live_without_console_errors(page, scene):
    for name in PAGES:
        open_page(page, scene, name)
        expect(page.locator("#status")).to_have_class("status live")
        assert not page.locator("#live .error-text[data-error-code]").count(), name
    assert page.errors == []
    assert page.evaluate("window.__pwned") is None


def test_overview_shows_engine_workers_and_modules(page, scene):
    open_page(page, scene, "overview")
    expect(page.get_by_test_id("version")).to_contain_text("0.")
    expect(page.get_by_test_id("worker-count")).to_contain_text("1")
    listeners = page.locator("table", has_text="modules::console::ConsoleModule")
    expect(listeners).to_contain_text("127.0.0.1:{}".format(scene.engine.ports["console"]))
    expect(page.locator("svg.chart")).to_have_count(2)  # calls/s and queue depths


def test_sdk_workers_function_appears_live(page, scene):
    open_page(page, scene, "functions")
    row = page.locator('tr[data-function-id="demo::greet"]')
    expect(row).to_contain_text("worker")
    expect(row).to_contain_text("http")  # the trigger bound to it
    # A function registered while the page is open appears without a reload.
    scene.worker.register_function({"id": "demo::late"}, lambda data: "late")
    expect(page.locator('tr[data-function-id="demo::late"]')).to_have_count(1)
    # The filter is applied by the server (a page shows at most 200 rows).
    page.fill("input[placeholder='filter by id']", "greet")
    expect(page.locator('tr[data-function-id="demo::late"]')).to_have_count(0)
    expect(row).to_have_count(1)
    open_page(page, scene, "workers")
    expect(page.get_by_test_id("workers")).to_contain_text("orders-worker")
    expect(page.get_by_test_id("workers")).to_contain_text("python")


def test_call_form_returns_the_result_and_the_error(page, scene):
    open_page(page, scene, "functions")
    page.fill("#call-function", "demo::greet")
    page.fill("#call-payload", '{"name": "Browser"}')
    page.click("#call-button")
    expect(page.get_by_test_id("call-result")).to_contain_text('"greeting": "Hello, Browser!"')
    expect(page.get_by_test_id("call-result")).to_have_class("result ok")
    page.fill("#call-function", "demo::nope")
    page.click("#call-button")
    expect(page.get_by_test_id("call-result")).to_contain_text("function_not_found")
    assert page.errors == []


def test_failing_call_shows_in_traces_and_dlq_and_redrive_moves_it_back(page, scene):
    scene.broken.set()
    scene.enqueue("demo::flaky", {"order": 42})
    open_page(page, scene, "queues")
    dlq = page.locator('[data-dlq="jobs"]')
    expect(dlq.get_by_test_id("dlq-error")).to_contain_text("card declined " + HOSTILE)
    expect(page.locator("#injected")).to_have_count(0)

    open_page(page, scene, "traces")
    page.fill("input[name=function]", "demo::flaky")
    page.select_option("select[name=status]", "error")
    page.click("text=Filter")
    failed = page.locator('tr[data-status="error"]', has_text="call demo::flaky").first
    expect(failed).to_be_visible()
    failed.click()
    waterfall = page.get_by_test_id("waterfall")
    expect(waterfall).to_contain_text("call demo::flaky")
    expect(waterfall).to_contain_text("card declined")
    expect(waterfall.locator(".bar.error").first).to_be_visible()

    calls_before = len(scene.flaky_calls)
    scene.broken.clear()
    open_page(page, scene, "queues")
    message = page.locator('[data-dlq="jobs"] tr[data-message-id]').first
    message.get_by_role("button", name="Redrive").click()
    expect(page.locator("#queue-output")).to_contain_text('"redriven": 1')
    wait_until(lambda: len(scene.flaky_calls) > calls_before, what="the redriven call")
    assert scene.flaky_calls[-1] == {"order": 42}
    expect(page.locator('[data-dlq="jobs"]')).to_have_count(0)
    expect(page.locator('tr[data-queue="jobs"]')).to_contain_text("0")
    assert page.errors == []


def test_discard_asks_first(page, scene):
    scene.broken.set()
    scene.enqueue("demo::flaky", {"order": "discard-me"})
    open_page(page, scene, "queues")
    row = page.locator('[data-dlq="jobs"] tr[data-message-id]', has_text="discard-me")
    row.get_by_role("button", name="Discard").click()
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-cancel")
    expect(row).to_have_count(1)
    row.get_by_role("button", name="Discard").click()
    page.click("#confirm-ok")
    expect(page.locator("#queue-output")).to_contain_text('"discarded": 1')
    expect(row).to_have_count(0)


def test_triggers_page_shows_pending_and_refused_triggers_and_why(page, scene):
    open_page(page, scene, "triggers")
    pending = page.get_by_test_id("pending-triggers")
    expect(pending).to_contain_text("nightly-report")
    expect(pending).to_contain_text("no provider registered this trigger type")
    refused = page.get_by_test_id("refused-triggers")
    expect(refused).to_contain_text("demo::flaky")
    expect(refused).to_contain_text("http_method must be one of")
    expect(page.locator("#live")).to_contain_text("api_path")


def test_state_edit_needs_confirmation(page, scene):
    open_page(page, scene, "state")
    page.click(".list a:text-is('users')")
    items = page.get_by_test_id("state-items")
    expect(items).to_contain_text('"role": "admin"')
    items.locator("tr", has_text="ada").get_by_role("button", name="Edit").click()
    page.fill("textarea[name=value]", '{"name": "Ada", "role": "owner"}')
    page.click("text=Save…")
    expect(page.locator("#confirm-detail")).to_contain_text('"role": "owner"')
    page.click("#confirm-ok")
    expect(items).to_contain_text('"role": "owner"')
    assert scene.call("state::get", {"scope": "users", "key": "ada"})["role"] == "owner"


def test_worker_text_is_shown_as_text(page, scene):
    open_page(page, scene, "streams")
    page.click(".list a:text-is('room-1')")
    expect(page.locator("#live")).to_contain_text(HOSTILE)
    open_page(page, scene, "functions")
    expect(page.locator('tr[data-function-id="demo::flaky"]')).to_contain_text(HOSTILE)
    assert page.locator("#injected").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_an_action_without_the_csrf_token_is_refused(page, scene):
    open_page(page, scene, "overview")
    status = page.evaluate("""async () => {
        const r = await fetch('/api/call', {method: 'POST',
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({function_id: 'demo::greet', payload: {}})});
        return r.status;
    }""")
    assert status == 403


def test_logs_filter_by_level_and_text(page, scene):
    scene.call("engine::log::info", {"message": "console-test info line"})
    scene.call("engine::log::error", {"message": "console-test error line"})
    open_page(page, scene, "logs")
    logs = page.get_by_test_id("logs")
    expect(logs).to_contain_text("console-test info line")
    page.fill("input[name=text]", "console-test")
    page.select_option("select[name=severity_min]", "17")
    page.click("text=Filter")
    expect(logs).to_contain_text("console-test error line")
    expect(logs).not_to_contain_text("console-test info line")
    expect(logs.locator("tbody tr")).to_have_count(1)


# -- with the engine's auth: (issue 13) ------------------------------------------------


@pytest.fixture(scope="module")
def auth_scene(tmp_path_factory):
    scene = Scene(tmp_path_factory.mktemp("console-auth"), auth=True).start()
    yield scene
    scene.stop()


@pytest.fixture
def auth_page(browser, auth_scene):
    context, page = _new_page(browser)
    yield page
    context.close()


def sign_in(page, scene, token):
    page.goto(scene.console_url + "#functions")
    page.fill("#token", token)
    page.click("form button[type=submit]")


def test_with_auth_the_console_asks_for_a_token(auth_page, auth_scene):
    page = auth_page
    page.goto(auth_scene.console_url)
    expect(page.locator("#token")).to_be_visible()
    expect(page.locator("nav a.active")).to_have_count(0)
    sign_in(page, auth_scene, "not-a-token")
    # The 401 of the refused token is the browser's one console error here.
    expect(page.locator("#login-error")).to_contain_text("refused")
    page.fill("#token", OPS_TOKEN)
    page.click("form button[type=submit]")
    expect(page.locator('tr[data-function-id="demo::flaky"]')).to_have_count(1)
    page.fill("#call-function", "demo::greet")
    page.fill("#call-payload", '{"name": "ops"}')
    page.click("#call-button")
    expect(page.get_by_test_id("call-result")).to_contain_text("Hello, ops!")
    assert all("401" in error for error in page.errors), page.errors


def test_with_auth_a_token_sees_and_does_what_its_grants_allow(auth_page, auth_scene):
    page = auth_page
    sign_in(page, auth_scene, VIEWER_TOKEN)
    functions = page.get_by_test_id("functions")
    expect(page.locator('tr[data-function-id="demo::greet"]')).to_have_count(1)
    # Discovery through the engine's checks: functions outside the grants are not listed.
    expect(page.locator('tr[data-function-id="demo::flaky"]')).to_have_count(0)
    expect(functions).not_to_contain_text("state::set")
    page.fill("#call-function", "demo::flaky")
    page.fill("#call-payload", "{}")
    page.click("#call-button")
    expect(page.get_by_test_id("call-result")).to_contain_text("FORBIDDEN")
    page.fill("#call-function", "demo::greet")
    page.fill("#call-payload", '{"name": "viewer"}')
    page.click("#call-button")
    expect(page.get_by_test_id("call-result")).to_contain_text("Hello, viewer!")
    open_page(page, auth_scene, "queues")
    expect(page.locator("#live [data-error-code=FORBIDDEN]")).to_be_visible()
    assert page.errors == []
