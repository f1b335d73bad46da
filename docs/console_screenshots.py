"""
Take the screenshots of docs/console.rst: an engine with the console, a real
``iii-sdk`` 0.10.0 worker (tests/interop/console_scene.py), headless Debian chromium
driven by Playwright. Writes docs/console/<page>.png.

    python docs/console_screenshots.py
"""

import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "interop"))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from console_scene import Scene  # noqa: E402
from engine_process import wait_until  # noqa: E402

OUT = os.path.join(HERE, "console")


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        scene = Scene(workdir).start()
        try:
            scene.fill()
            scene.broken.set()
            scene.enqueue("demo::flaky", {"order": 42, "amount": "19.90"})
            scene.enqueue("demo::flaky", {"order": 43, "amount": "5.00"})
            wait_until(lambda: len(scene.flaky_calls) >= 2, what="the failing deliveries")
            scene.call("engine::log::warn", {"message": "payment provider slow",
                                             "data": {"latency_ms": 812}})
            shoot(scene, traffic)
        finally:
            scene.stop()


def traffic(scene, seconds):
    """Calls and a queue backlog for the overview's charts, for C{seconds}."""
    for i in range(16):
        scene.enqueue("demo::slow", {"job": i})
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        scene.call("demo::greet", {"name": "load {}".format(i)})
        time.sleep(0.03)  # a steady trickle, not a flood the span store forgets
        i += 1
        if i % 40 == 0:
            for j in range(6):
                scene.enqueue("demo::slow", {"job": j})


def shoot(scene, traffic):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.set_default_timeout(15000)

        def open_page(name):
            page.goto(scene.console_url + "#" + name)
            expect(page.locator("#live > .notice", has_text="loading")).to_have_count(0)

        def save(name):
            page.wait_for_timeout(300)  # let the last push paint
            page.screenshot(path=os.path.join(OUT, name + ".png"))

        open_page("overview")
        traffic(scene, 8)  # a few samples for the charts (sampled every second)
        save("overview")
        for name in ("workers", "triggers", "logs", "queues"):
            open_page(name)
            save(name)
        open_page("functions")
        page.fill("#call-function", "demo::greet")
        page.fill("#call-payload", '{"name": "Ada"}')
        page.click("#call-button")
        expect(page.get_by_test_id("call-result")).to_contain_text("Hello")
        save("functions")
        open_page("traces")
        page.select_option("select[name=status]", "error")
        page.click("text=Filter")
        page.locator('tr[data-status="error"]').first.click()
        expect(page.get_by_test_id("waterfall")).to_be_visible()
        save("traces")
        open_page("state")
        page.click(".list a:text-is('users')")
        expect(page.get_by_test_id("state-items")).to_be_visible()
        save("state")
        open_page("streams")
        page.click(".list a:text-is('room-1')")
        expect(page.locator("#live")).to_contain_text("m1")
        save("streams")
        browser.close()


if __name__ == "__main__":
    main()
