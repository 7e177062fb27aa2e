"""The screenshots in docs/serve.md: the chat page of `phiforge serve MODEL`, two questions asked greedily, at desktop
and phone sizes, in headless Debian chromium through Playwright (as tests/test_chat_page.py drives it).

    python scripts/chat_page_screenshot.py runs/default/final      # the default recipe's chat model (make run)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from phiforge.serve import start_background  # noqa: E402
from tests.test_chat_page import ARGS, CHROMIUM  # noqa: E402

DONE = ("() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return m && m.querySelector('.stats').textContent !== '' && document.getElementById('stop').hidden; }")


def main(model: str, out: Path = ROOT / "docs" / "img") -> None:
    url, stop = start_background(model, max_batch=4, max_queue=8)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(url + "/")
            page.wait_for_selector("#app[data-ready]", state="attached")
            page.click("#settings summary")
            page.fill("#temperature", "0")
            for question in ("What does `json.dumps` do?", "What does `os.path.join` do?"):
                page.fill("#input", question)
                page.press("#input", "Enter")
                page.wait_for_function(DONE)
            page.screenshot(path=str(out / "chat_page.png"))
            page.set_viewport_size({"width": 390, "height": 760})
            time.sleep(0.5)  # the layout settles
            page.screenshot(path=str(out / "chat_page_phone.png"))
            browser.close()
    finally:
        stop()
    print(f"wrote {out / 'chat_page.png'} and {out / 'chat_page_phone.png'}")


if __name__ == "__main__":
    main(sys.argv[1])
