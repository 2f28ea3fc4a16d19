"""Screenshots of the chat page for the README: docs/chat-light.png and docs/chat-dark.png.

    make screenshots        # or: .venv/bin/python -m tests.web.screenshots [--out docs]

Serves the project under uvicorn with the fake OpenAI server (tests/web/live.py), holds a short
conversation with a Markdown reply through the page itself, and shoots it in both colour
schemes with headless Chromium (/usr/bin/chromium)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.fake_openai import FakeOpenAI
from tests.web.live import CHROMIUM, ROOT, launch_browser, prepare_database, start_service

OTHER_CHATS = [
    "Weekend hiking checklist",
    "Explain CRDTs simply",
    "SQL window functions",
    "Birthday message for Sam",
]

TURNS = [
    (
        "How do I read a huge CSV file in Python without loading it all?",
        "Stream it row by row with the standard library's `csv` module: the file is read "
        "lazily, so memory stays flat however large it is.\n\n"
        "```python\n"
        "import csv\n\n"
        "def total(path):\n"
        "    with open(path, newline='') as f:\n"
        "        return sum(float(row['amount']) for row in csv.DictReader(f))\n"
        "```\n\n"
        "- `newline=''` lets the reader handle quoted line breaks.\n"
        "- For columnar work, `pandas.read_csv(path, chunksize=100_000)` yields DataFrames.",
    ),
    (
        "And if some rows are malformed?",
        "Catch the conversion error and count the row instead of failing: **skip, log, "
        "continue**. Report the count at the end so bad input is never silent.",
    ),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 1
    from playwright.sync_api import expect, sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(latency=0.2) as fake:
        database = prepare_database(Path(tmp) / "template.sqlite3")
        service = start_service(
            Path(tmp) / "service", fake.url, database=database, CHAT_USER_BUDGET_USD="5"
        )
        try:
            for title in OTHER_CHATS:
                service.request("POST", "/api/conversations/", {"title": title})
            with sync_playwright() as playwright:
                browser = launch_browser(playwright)
                page = browser.new_page(
                    base_url=service.url, viewport={"width": 1280, "height": 800}
                )
                page.goto("/")
                page.locator("body.ready").wait_for()
                box = page.get_by_role("textbox", name="Message")
                for number, (prompt, answer) in enumerate(TURNS, start=1):
                    fake.reply = answer
                    box.fill(prompt)
                    box.press("Enter")
                    copy_buttons = page.get_by_role("button", name="Copy reply")
                    expect(copy_buttons).to_have_count(number)
                page.mouse.move(0, 0)
                for scheme in ("light", "dark"):
                    page.emulate_media(color_scheme=scheme)
                    page.wait_for_timeout(200)
                    target = args.out / f"chat-{scheme}.png"
                    page.screenshot(path=str(target))
                    print(f"wrote {target}")
                browser.close()
        finally:
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
