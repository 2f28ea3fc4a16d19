"""The chat page in headless Chromium against the real service under uvicorn (tests/web/live.py),
with the fake OpenAI server's prompt markers shaping the replies: `[[reply:TEXT]]`,
`[[latency:S]]` with `[[chunks:N]]` for a slow streamed reply, `[[fault:...]]`."""

from __future__ import annotations

import re

import pytest

from tests.web.live import require_chromium

require_chromium()

from playwright.sync_api import expect  # noqa: E402

from tests.web.helpers import (  # noqa: E402
    chats,
    reply,
    reply_text,
    send,
    turns,
    words,
)


def test_a_reply_streams_in_as_it_is_generated(page):
    text = words("word", 20)
    send(page, f"Count for me [[reply:{text}]] [[latency:2]] [[chunks:10]]")

    answer = reply_text(page)
    expect(answer).to_contain_text("word1")
    partial = answer.inner_text()
    assert "word20" not in partial  # seen while still growing
    expect(page.get_by_role("button", name="Stop generating")).to_be_visible()

    expect(answer).to_have_text(text)
    expect(page.get_by_role("button", name="Stop generating")).to_be_hidden()
    expect(reply(page).get_by_role("button", name="Regenerate reply")).to_be_visible()
    expect(reply(page)).to_contain_text("gpt-3.5-turbo")
    # Announced once, complete, to screen readers.
    expect(page.locator("[aria-live=polite]")).to_contain_text("word20")
    # The new chat is selected, in the URL and at the top of the list.
    assert re.search(r"\?c=\d+$", page.url)
    first = chats(page).get_by_role("listitem").first
    expect(first.get_by_role("link")).to_have_text(re.compile(r"^Count for me"))
    expect(first.get_by_role("link")).to_have_attribute("aria-current", "page")


def test_a_conversation_continues_with_its_context(page, fake):
    send(page, "My name is Ada. [[reply:Nice to meet you, Ada.]]")
    expect(reply_text(page, 0)).to_have_text("Nice to meet you, Ada.")
    address = page.url

    send(page, "What is my name? [[reply:Your name is Ada.]]")
    expect(reply_text(page, 1)).to_have_text("Your name is Ada.")
    assert page.url == address
    sent = fake.chat_requests()[-1].json["messages"]
    assert any("My name is Ada." in str(m.get("content")) for m in sent)

    page.reload()
    expect(turns(page)).to_have_count(2)
    expect(reply_text(page, 0)).to_have_text("Nice to meet you, Ada.")
    expect(reply_text(page, 1)).to_have_text("Your name is Ada.")


def test_reloading_or_reopening_mid_stream_follows_the_reply_to_its_end(page, new_page):
    text = words("part", 24)
    send(page, f"Tell a long story [[reply:{text}]] [[latency:3]] [[chunks:12]]")
    expect(reply_text(page)).to_contain_text("part2")
    address = page.url

    page.reload()
    expect(page.get_by_role("button", name="Stop generating")).to_be_visible()
    other = new_page()  # the same chat opened elsewhere
    other.goto(address)
    for seen in (page, other):
        expect(reply_text(seen)).to_have_text(text)
        expect(seen.get_by_role("button", name="Stop generating")).to_be_hidden()
        expect(turns(seen)).to_have_count(1)


def test_following_the_reply_pauses_while_the_reader_scrolls_up(page):
    lines = "\n\n".join(f"Line {i}." for i in range(1, 81))
    send(page, f"Many lines [[reply:{lines}]] [[latency:3]] [[chunks:40]]")
    answer = reply_text(page)
    expect(answer).to_contain_text("Line 25.")
    transcript = page.get_by_role("region", name="Messages")
    distance = "e => e.scrollHeight - e.scrollTop - e.clientHeight"
    assert transcript.evaluate(distance) < 30  # following the reply down

    box = transcript.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -500)
    jump = page.get_by_role("button", name="Jump to latest")
    expect(jump).to_be_visible()
    position = transcript.evaluate("e => e.scrollTop")
    expect(answer).to_contain_text("Line 60.")  # still growing...
    assert abs(transcript.evaluate("e => e.scrollTop") - position) <= 2  # ...the view stays put
    expect(answer).to_contain_text("Line 80.")
    assert transcript.evaluate(distance) > 200

    jump.click()
    expect(jump).to_be_hidden()
    assert transcript.evaluate(distance) < 30


def test_escape_stops_the_reply(page):
    text = words("w", 40)
    send(page, f"Go on and on [[reply:{text}]] [[latency:4]] [[chunks:20]]")
    answer = reply_text(page)
    expect(answer).to_contain_text("w3")
    page.keyboard.press("Escape")

    expect(reply(page)).to_contain_text("Stopped.")
    expect(page.get_by_role("button", name="Stop generating")).to_be_hidden()
    shown = answer.inner_text()
    page.wait_for_timeout(800)
    assert answer.inner_text() == shown
    assert "w40" not in shown
    expect(page.get_by_role("textbox", name="Message")).to_be_focused()


def test_stop_cancels_the_generation_on_the_server(page):
    """POST /api/messages/{id}/cancel/: the partial text is kept, the status is cancelled."""
    text = words("s", 40)
    send(page, f"Keep talking [[reply:{text}]] [[latency:4]] [[chunks:20]]")
    expect(reply_text(page)).to_contain_text("s3")
    page.get_by_role("button", name="Stop generating").click()
    expect(reply(page)).to_contain_text("Stopped.")

    page.wait_for_timeout(500)
    page.reload()
    expect(reply(page)).to_contain_text("Stopped.")
    kept = reply_text(page).inner_text()
    assert kept.startswith("s1 s2") and "s40" not in kept


def test_regenerate_replaces_the_reply_and_keeps_the_earlier_one(page):
    send(page, "Pick a colour [[reply:Teal.]] [[latency:0.6]] [[chunks:3]]")
    expect(reply_text(page)).to_have_text("Teal.")
    expect(reply(page)).to_contain_text("gpt-3.5-turbo")

    page.get_by_role("combobox", name="Model").select_option("gpt-4o")
    reply(page).get_by_role("button", name="Regenerate reply").click()
    expect(page.get_by_role("button", name="Stop generating")).to_be_visible()
    expect(reply(page).get_by_role("button", name="Regenerate reply")).to_be_visible()
    expect(reply_text(page)).to_have_text("Teal.")
    expect(reply(page)).to_contain_text("gpt-4o")
    expect(reply(page)).to_contain_text("1 earlier reply")
    expect(turns(page)).to_have_count(1)

    page.reload()
    expect(reply(page)).to_contain_text("1 earlier reply")


def test_an_upstream_error_is_shown_and_retried(page, fake):
    fake.fail_next("500")
    send(page, "Are you there?")

    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The model service failed")
    expect(reply(page)).to_contain_text("HTTP 500")  # the stored failure, in the transcript
    alert.get_by_role("button", name="Retry", exact=True).click()

    expect(reply_text(page)).to_have_text("Echo: Are you there?")
    expect(alert).to_be_hidden()
    expect(reply(page).get_by_text("The model API failed with HTTP 500.")).to_be_hidden()
    expect(reply(page)).to_contain_text("1 earlier reply")  # the failure, kept by the API


def test_an_upstream_rate_limit_is_explained_with_a_retry(page, fake):
    send(page, "Busy? [[fault:429:2]]")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The model service is rate-limiting this server.")
    # Retry counts down from `retry_after` when the error carries it (see the next test); a
    # failure replayed from the stored message has none, so the button may be ready at once.
    retry = alert.get_by_role("button", name=re.compile(r"^Retry"))
    expect(retry).to_be_enabled(timeout=5_000)
    retry.click()  # regenerates the stored prompt (which asks the fake for a 429 again)
    expect(reply(page)).to_contain_text("1 earlier reply")
    expect(alert).to_contain_text("rate-limiting")
    assert len(fake.chat_requests()) == 2


def test_rate_limits_and_budgets_of_the_service_are_explained(page):
    """The service's own 429 and budget answers (error bodies as the API documents them),
    served here by the browser's request routing: no prompt is stored, it goes back in the box."""
    limited = {
        "error": {
            "status": 429,
            "code": "rate_limited",
            "message": "Request was throttled.",
            "retry_after": 2,
        }
    }
    page.route(
        "**/api/messages/create/",
        lambda route: route.fulfill(status=429, json=limited, headers={"Retry-After": "2"}),
    )
    send(page, "Hello again [[reply:Back again.]]")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("You are sending messages too quickly. Try again in 2 seconds.")
    expect(page.get_by_role("textbox", name="Message")).to_have_value(
        "Hello again [[reply:Back again.]]"
    )
    expect(turns(page)).to_have_count(0)
    retry = alert.get_by_role("button", name=re.compile(r"^Retry"))
    expect(retry).to_be_disabled()

    page.unroute("**/api/messages/create/")
    expect(retry).to_be_enabled(timeout=5_000)
    retry.click()
    expect(reply_text(page)).to_have_text("Back again.")

    over = {  # as billing answers it
        "error": {
            "status": 429,
            "code": "budget_exceeded",
            "message": "This request could cost up to $0.0123 but only $0 of your $5 monthly "
            "budget remains; it resets at 2031-01-01T00:00:00Z.",
            "budget_usd": "5",
            "spent_usd": "5",
            "reserved_usd": "0",
            "remaining_usd": "0",
            "required_usd": "0.0123",
            "resets_at": "2031-01-01T00:00:00Z",
            "retry_after": 86400,
        }
    }
    page.route(
        "**/api/messages/create/",
        lambda route: route.fulfill(status=429, json=over, headers={"Retry-After": "86400"}),
    )
    send(page, "One more")
    expect(alert).to_contain_text("You have used your budget of $5.00.")
    expect(alert).to_contain_text("$0.00 left")
    expect(alert).to_contain_text("It resets on")
    expect(alert).to_contain_text("2031")
    expect(alert.get_by_role("button", name=re.compile("^Retry"))).to_be_hidden()


def test_markdown_from_the_model_is_rendered_inert(page):
    payload = (
        "Tricks: <script>window.__owned = 1</script> and "
        '<img src="x" onerror="window.__owned = 2"> and '
        "[click me](javascript:window.__owned=3) and <javascript:alert(4)> and "
        '<a href="javascript:alert(5)">raw link</a> and [docs](https://example.com/docs)'
    )
    send(page, f"Show me tricks [[reply:{payload}]]")
    answer = reply_text(page)
    expect(answer.get_by_role("link", name="docs")).to_be_visible()

    # Raw HTML is shown as text, never made into elements.
    expect(answer).to_contain_text("<script>window.__owned = 1</script>")
    expect(answer).to_contain_text('<img src="x" onerror="window.__owned = 2">')
    expect(answer).to_contain_text('<a href="javascript:alert(5)">raw link</a>')
    assert answer.locator("script, img, iframe, [onerror]").count() == 0
    # javascript: links are not links.
    assert answer.locator("[href^='javascript' i]").count() == 0
    expect(answer.get_by_role("link", name="click me")).to_have_count(0)
    answer.get_by_text("click me", exact=False).click()
    # Safe links open in a new tab without access to this page.
    docs = answer.get_by_role("link", name="docs")
    expect(docs).to_have_attribute("href", "https://example.com/docs")
    expect(docs).to_have_attribute("target", "_blank")
    expect(docs).to_have_attribute("rel", "noopener noreferrer")
    assert page.evaluate("window.__owned") is None


TRICKY_MARKDOWN = [
    "[a](JaVaScRiPt:alert(1))",
    "[b](  javascript:alert(1))",
    "[c](&#x6A;avascript:alert(1))",
    "[d](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[e](vbscript:msgbox(1))",
    "[f](/relative/path) [g](#fragment)",
    "![h](javascript:alert(1)) ![i](https://example.com/i.png)",
    "<a href='javascript:alert(1)'>j</a> <svg onload=alert(1)> <iframe src=//evil>",
    "<javascript:alert(1)> <https://example.com/ok> mail@example.com",
    "| x |\n|--:|\n| 1 |",
]


def test_the_markdown_renderer_keeps_only_safe_links(page):
    """markdown.js directly, on inputs made to slip past a renderer."""
    rendered = page.evaluate(
        """async (inputs) => {
            const { renderMarkdown } = await import("/static/web/markdown.js");
            return inputs.map((text) => {
                const box = document.createElement("div");
                box.append(renderMarkdown(text));
                return {
                    html: box.innerHTML,
                    hrefs: [...box.querySelectorAll("[href]")].map((a) => a.getAttribute("href")),
                    bad: box.querySelectorAll("script, img, svg, iframe, [style], [src]").length,
                    handlers: [...box.querySelectorAll("*")].some((node) =>
                        [...node.attributes].some((attr) => attr.name.startsWith("on"))),
                };
            });
        }""",
        TRICKY_MARKDOWN,
    )
    hrefs = [href for result in rendered for href in result["hrefs"]]
    assert hrefs == [
        "https://example.com/i.png",
        "https://example.com/ok",
        "mailto:mail@example.com",
    ]
    assert all(result["bad"] == 0 and not result["handlers"] for result in rendered), rendered
    assert "&lt;svg onload=alert(1)&gt;" in rendered[7]["html"]
    assert 'class="align-right"' in rendered[9]["html"]


def test_the_event_stream_parser_reassembles_events_from_any_chunks(page):
    events = page.evaluate(
        """async (text) => {
            const { createEventParser } = await import("/static/web/api.js");
            const events = [];
            const parser = createEventParser((name, data) => events.push([name, data]));
            for (const character of text) parser.push(character);  // the worst split
            parser.end();
            return events;
        }""",
        'event: start\r\ndata: {"id": 1}\r\n\r\n: keep-alive\n\n'
        'event: delta\ndata: {"content": "a\\nb"}\n\n'
        "data: first\ndata: second\n\nevent: message\ndata: {}",
    )
    assert events == [
        ["start", '{"id": 1}'],
        ["delta", '{"content": "a\\nb"}'],
        ["message", "first\nsecond"],
        ["message", "{}"],
    ]


def test_copy_a_reply_and_a_code_block(new_page):
    page = new_page(permissions=["clipboard-read", "clipboard-write"])
    page.goto("/")
    code = "def hello():\n    return 'hi'"
    send(page, f"Some code [[reply:Here it is:\n\n```python\n{code}\n```\n]]")
    block = reply_text(page).locator(".code-block")
    expect(block).to_contain_text("return 'hi'")
    expect(block).to_contain_text("python")

    block.get_by_role("button", name="Copy python code").click()
    expect(block.get_by_role("button", name="Copy python code")).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == code + "\n"

    reply(page).get_by_role("button", name="Copy reply").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("Here it is:") and "```python" in copied


def test_the_chosen_model_answers(page):
    options = page.get_by_role("combobox", name="Model").locator("option")
    expect(options.filter(has_text="gpt-4o-mini")).to_have_count(1)
    page.get_by_role("combobox", name="Model").select_option("gpt-4o-mini")
    send(page, "Which model? [[reply:This one.]]")
    expect(reply_text(page)).to_have_text("This one.")
    expect(reply(page)).to_contain_text("gpt-4o-mini")


def test_rename_and_delete_a_chat(page):
    send(page, "Plan a trip to Lisbon [[reply:Sure.]]")
    expect(reply_text(page)).to_have_text("Sure.")
    item = chats(page).get_by_role("listitem").filter(has_text="Plan a trip to Lisbon")

    item.get_by_role("button", name=re.compile("^Rename chat")).click()
    title = chats(page).get_by_role("textbox", name=re.compile("Chat title"))
    title.fill("Lisbon trip")
    title.press("Enter")
    expect(chats(page).get_by_role("link", name="Lisbon trip")).to_be_visible()
    expect(page.get_by_role("heading", level=1)).to_have_text("Lisbon trip")

    page.reload()
    expect(page.get_by_role("heading", level=1)).to_have_text("Lisbon trip")
    item = chats(page).get_by_role("listitem").filter(has_text="Lisbon trip")
    item.get_by_role("button", name="Delete chat: Lisbon trip").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("“Lisbon trip” and all its messages will be deleted.")
    dialog.get_by_role("button", name="Delete").click()

    expect(chats(page).get_by_role("link", name="Lisbon trip")).to_have_count(0)
    expect(page.get_by_role("heading", level=1)).to_have_text("New chat")
    expect(turns(page)).to_have_count(0)
    assert not re.search(r"\?c=", page.url)


def test_chats_are_listed_newest_activity_first(page):
    send(page, "Older chat [[reply:one]]")
    expect(reply_text(page)).to_have_text("one")
    page.get_by_role("button", name="New chat").click()
    send(page, "Newer chat [[reply:two]]")
    expect(reply_text(page)).to_have_text("two")
    links = chats(page).get_by_role("link")
    expect(links.nth(0)).to_have_text(re.compile("^Newer chat"))
    expect(links.nth(1)).to_have_text(re.compile("^Older chat"))

    links.nth(1).click()  # continuing the older chat moves it to the top
    expect(reply_text(page)).to_have_text("one")
    send(page, "Still there? [[reply:yes]]")
    expect(reply_text(page)).to_have_text("yes")
    expect(links.nth(0)).to_have_text(re.compile("^Older chat"))


def test_keyboard_only_from_the_first_tab_to_a_reply(page):
    box = page.get_by_role("textbox", name="Message")
    expect(box).to_be_focused()  # where a new page puts the keyboard
    # The skip link (first in the tab order, shown on focus) leads to the box.
    skip = page.get_by_role("link", name="Skip to the message box")
    skip.focus()
    expect(skip).to_be_visible()
    page.keyboard.press("Enter")
    expect(box).to_be_focused()
    # From the top bar, Tab reaches the box.
    page.get_by_role("combobox", name="Model").focus()
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "prompt":
            break
    expect(box).to_be_focused()
    page.keyboard.type("Typed with keys only [[reply:Keys work.]]")
    page.keyboard.press("Enter")
    expect(reply_text(page)).to_have_text("Keys work.")
    # The reply's actions appear once it is stored (after its text).
    expect(page.get_by_role("button", name="Regenerate reply")).to_be_visible()

    # The reply's actions are next in the tab order after the box's own buttons.
    page.keyboard.press("Shift+Tab")
    for _ in range(12):
        focused = page.evaluate("document.activeElement.getAttribute('aria-label')")
        if focused == "Regenerate reply":
            break
        page.keyboard.press("Shift+Tab")
    else:
        pytest.fail("Regenerate is not reachable with the keyboard")
    page.keyboard.press("Enter")
    expect(reply(page)).to_contain_text("1 earlier reply")


def test_shift_enter_is_a_new_line_and_enter_while_composing_does_nothing(page):
    box = page.get_by_role("textbox", name="Message")
    box.click()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    expect(box).to_have_value("line one\nline two")

    # An input method (e.g. for Japanese) confirms its composition with Enter.
    box.dispatch_event("keydown", {"key": "Enter", "code": "Enter", "isComposing": True})
    page.wait_for_timeout(300)
    expect(box).to_have_value("line one\nline two")
    expect(turns(page)).to_have_count(0)

    page.keyboard.press("Enter")
    expect(turns(page)).to_have_count(1)
    expect(turns(page).first.locator(".bubble")).to_have_text("line one\nline two")
    expect(box).to_have_value("")


def test_the_page_has_no_console_errors_and_a_strict_csp(new_page):
    page = new_page()
    response = page.goto("/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "style-src 'self';" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    page.locator("body.ready").wait_for()
    assert page.locator("script:not([src]):not([type='application/json'])").count() == 0
    assert page.locator("[style]").count() == 0

    table = "| left | right | centre |\n|:--|--:|:-:|\n| 1 | 2 | 3 |"
    send(page, f"Markdown please [[reply:# Title\n\n*emphasis* and `code`\n\n{table}\n]]")
    expect(reply_text(page).locator("table")).to_be_visible()
    expect(reply_text(page).get_by_role("heading", name="Title")).to_be_visible()
    page.wait_for_timeout(300)

    assert page.problems.errors == []
    assert page.problems.exceptions == []


def test_dark_mode_follows_the_system(new_page):
    def background(scheme: str) -> tuple[int, ...]:
        page = new_page(color_scheme=scheme)
        page.goto("/")
        page.locator("body.ready").wait_for()
        color = page.evaluate("getComputedStyle(document.body).backgroundColor")
        return tuple(int(c) for c in re.findall(r"\d+", color)[:3])

    def luminance(rgb: tuple[int, ...]) -> float:
        r, g, b = rgb
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255

    assert luminance(background("dark")) < 0.2
    assert luminance(background("light")) > 0.9


def test_narrow_screens_hide_the_sidebar_behind_a_button(new_page):
    page = new_page(viewport={"width": 390, "height": 800})
    page.goto("/")
    page.locator("body.ready").wait_for()
    menu = page.get_by_role("button", name="Show chats")
    expect(page.get_by_role("button", name="New chat")).to_be_hidden()
    expect(menu).to_have_attribute("aria-expanded", "false")
    menu.click()
    expect(menu).to_have_attribute("aria-expanded", "true")
    expect(page.get_by_role("button", name="New chat")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.get_by_role("button", name="New chat")).to_be_hidden()
    expect(menu).to_be_focused()


def test_a_refusal_is_shown_as_one(page):
    send(page, "Do something bad [[refusal:I can't help with that.]]")
    expect(page.get_by_role("button", name="Stop generating")).to_be_hidden()
    expect(reply(page)).to_contain_text("The model declined: I can't help with that.")
    page.reload()
    expect(reply(page)).to_contain_text("The model declined: I can't help with that.")


def test_usage_and_models_come_from_the_api(page, service):
    _, models = service.request("GET", "/api/models/")
    expect(page.get_by_role("combobox", name="Model").locator("option")).to_have_text(
        [m["id"] for m in models["results"]]
    )
    expect(page.get_by_role("combobox", name="Model")).to_have_value(models["default"])

    usage = page.get_by_role("region", name="Usage this month")
    expect(usage).to_be_visible()
    send(page, "Spend a little [[reply:Spent.]]")
    expect(reply_text(page)).to_have_text("Spent.")
    expect(reply(page)).to_contain_text(re.compile(r"tokens · \$\d"))  # the reply's cost
    expect(usage).to_contain_text("$")
    expect(usage).to_contain_text(re.compile(r"\d+ requests?"))
