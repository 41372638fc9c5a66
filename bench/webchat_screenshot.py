"""A screenshot of the web chat (`lmforge serve`'s page at /) after one exchange, for the docs.

    python bench/webchat_screenshot.py                      # runs/sft-d3 -> docs/img/serve_chat.png
    python bench/webchat_screenshot.py runs/sft-demo --out /tmp/chat.png --message "Write heappush."

The server runs in this process on a free loopback port; the page runs in Debian's Chromium
(`apt-get install chromium`) driven by Playwright, whose own browser download is not needed.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.serve.app import ServeConfig, State, create_app  # noqa: E402

KEY = "k-screenshot-0001"


def chromium() -> str:
    for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")):
        if p and Path(p).exists():
            return p
    sys.exit("Chromium is not installed: apt-get install chromium")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="runs/sft-d3", help="a chat model directory (default runs/sft-d3)")
    ap.add_argument("--out", default="docs/img/serve_chat.png")
    # Phrased like the SFT conversations (runs/chats) that runs/sft-d3 learned from.
    ap.add_argument("--message", default="Write a function is_palindrome(s) that return True if s reads the same "
                                         "forwards and backwards.")
    ap.add_argument("--system", default="", help="a system prompt (the SFT data has none)")
    ap.add_argument("--temperature", default="0.3")
    ap.add_argument("--max-tokens", default="120")
    ap.add_argument("--size", default="1100x750", help="viewport WIDTHxHEIGHT")
    a = ap.parse_args()

    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        cfg = ServeConfig(models=[a.model], api_keys={KEY: "default"}, dir=Path(d), calibrate=False, port=port)
        state = State(cfg)
        server = uvicorn.Server(uvicorn.Config(create_app(cfg, state), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if state.status == "failed":
                    sys.exit(f"the server failed to load {a.model}: {state.error}")
                if time.time() > deadline:
                    sys.exit(f"the server at {url} did not become ready in 120 s")
                time.sleep(0.1)

            width, height = (int(x) for x in a.size.split("x"))
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
                try:
                    page = browser.new_page(viewport={"width": width, "height": height})
                    page.goto(url)
                    page.fill("#api-key", KEY)
                    expect(page.locator("#model option")).not_to_have_count(0)
                    # The listing's 401 from before the key was entered is gone once the models load.
                    expect(page.locator(".msg.error")).to_have_count(0)
                    page.fill("#system", a.system)
                    page.fill("#temperature", a.temperature)
                    page.fill("#max-tokens", a.max_tokens)
                    page.fill("#input", a.message)
                    page.click("#send")
                    expect(page.locator("#send")).to_be_enabled(timeout=120_000)
                    out = Path(a.out)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(out))
                    print(f"{out}: {width}x{height}; {page.text_content('#speed')}")
                finally:
                    browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
