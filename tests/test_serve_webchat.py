"""The web chat page (lmforge/serve/static/chat.html) in a real headless Chromium against a live server:
streamed answers, the history sent each turn, the tokens/s readout, Stop, API errors shown in the
page, and nothing fetched from anywhere but the server itself."""

import json
import os
import re
import shutil
import time

import pytest

from conftest import RANDOM_CHAT_CTX
from serving import serving, wait_until

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")) if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")

KEY = "k-test-123456"
CTX = RANDOM_CHAT_CTX


@pytest.fixture
def served(random_chat_model, tmp_path):
    from lmforge.serve.app import ServeConfig, State, create_app

    # A thread engine: the test slows its steps from here (the page, not the engine, is under test).
    cfg = ServeConfig(models=[f"web={random_chat_model}"], api_keys={KEY: "default"}, dir=tmp_path, calibrate=False,
                      max_seqs=2, engine="thread")
    state = State(cfg)
    with serving(create_app(cfg, state), ready_timeout=60) as url:
        yield url, state


def statuses(state):
    return [r["status"] for r in state.usage.for_user("default")["recent"]]


def test_web_chat_streams_keeps_history_stops_and_loads_nothing_external(served):
    url, state = served
    engine = state.models["web"].engine
    expect = sync_api.expect
    requests, page_errors, chat_bodies = [], [], []

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and chat_bodies.append(
                json.loads(r.post_data)))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(url)

            # Without a key the listing's 401 is shown as words, not as a silent empty picker.
            err = page.locator(".msg.error")
            expect(err).to_contain_text("401")
            expect(err).to_contain_text("missing API key")
            page.fill("#api-key", KEY)
            expect(page.locator("#model")).to_have_value("web")
            expect(err).to_have_count(0)
            assert page.evaluate("localStorage.getItem('lmforge.apiKey')") == KEY

            # One short exchange.
            page.fill("#system", "Answer in Python.")
            page.fill("#temperature", "0.5")
            page.fill("#max-tokens", "16")
            page.fill("#input", "hello there")
            page.click("#send")
            expect(page.locator("#send")).to_be_enabled(timeout=20_000)
            expect(page.locator(".msg.user")).to_have_text("hello there")
            first = page.locator(".msg.assistant .text").first
            assert first.text_content().strip(), "no streamed text reached the assistant message"
            expect(page.locator("#speed")).to_contain_text(re.compile(r"\d+ tokens?"))
            assert chat_bodies[0]["stream"] is True and chat_bodies[0]["max_tokens"] == 16
            assert chat_bodies[0]["temperature"] == 0.5 and chat_bodies[0]["model"] == "web"

            # A long answer (up to the context), watched as it grows, then stopped. Each engine step is
            # slowed a little so that a fast machine cannot finish the answer before the click lands.
            step = engine.step
            engine.step = lambda: (time.sleep(0.005), step())[1]
            page.fill("#max-tokens", "")
            page.fill("#input", "and again")
            page.click("#send")
            answer = page.locator(".msg.assistant .text").nth(1)
            lengths = [0]

            def grew():
                n = len(answer.text_content())
                if n > lengths[-1]:
                    lengths.append(n)
                return len(lengths) >= 4

            assert wait_until(grew, 20), f"the answer did not stream in pieces: lengths {lengths}"
            assert engine.n_active == 1
            expect(page.locator("#stop")).to_be_enabled()
            page.click("#stop")
            assert wait_until(lambda: engine.n_active == 0, 5), "Stop did not end the generation on the server"
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_disabled()
            expect(page.locator(".msg.assistant .note")).to_have_text(["cut off at max tokens (or the end of the context)",
                                                                       "stopped"])
            speed = page.locator("#speed")
            expect(speed).to_contain_text(re.compile(r"^\d+ tokens · \d+\.\d tok/s$"))
            assert int(speed.text_content().split()[0]) < CTX // 2, "the answer ran on instead of stopping"
            stopped_at = answer.text_content()
            time.sleep(0.3)
            assert answer.text_content() == stopped_at
            assert wait_until(lambda: statuses(state) == ["ok", "cancelled"], 5), statuses(state)

            # The whole conversation goes with each turn: system prompt, both sides of the first exchange.
            sent = chat_bodies[1]["messages"]
            assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
            assert sent[0]["content"] == "Answer in Python." and sent[3]["content"] == "and again"
            assert sent[2]["content"] == first.text_content() and "max_tokens" not in chat_bodies[1]

            # An API error (400, the context is too small) is shown, and the text comes back to be fixed.
            page.fill("#max-tokens", str(CTX * 10))
            page.fill("#input", "too long an answer")
            page.click("#send")
            expect(err).to_contain_text("400 context_length_exceeded")
            expect(err).to_contain_text("exceeds the model's context")
            expect(page.locator("#input")).to_have_value("too long an answer")
            expect(page.locator(".msg.user")).to_have_count(2)

            page.click("#new-chat")
            expect(page.locator(".msg")).to_have_count(0)
        finally:
            browser.close()

    assert not page_errors, page_errors
    outside = [u for u in requests if not u.startswith(url + "/")]
    assert not outside, f"the page fetched from outside the server: {outside}"
    assert any(u.endswith("/v1/models") for u in requests)
