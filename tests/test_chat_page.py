"""The chat page at / in a real headless Chromium (the OS package), against `python serve.py`
serving the default model: a message sent on the page streams back the reply the API gives."""
import os
import shutil

import openai
import pytest

from helpers import start_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MESSAGE = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(real_checkpoint, tmp_path_factory):
    """serve.py with no model flags: it serves the default model."""
    proc = start_server(["--max_batch_size", 2, "--max_seq_length", 512],
                        tmp_path_factory.mktemp("log") / "serve.log")
    yield proc.url
    proc.terminate()
    assert proc.wait(60) == 0, proc.log.read_text()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs the chromium package")
        pytest.skip("apt-get install chromium to run the chat page test")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_the_chat_page_streams_the_reply_of_the_api(server, browser):
    from playwright.sync_api import expect
    api = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    want = api.chat.completions.create(model="SmolLM2-135M-Instruct",
                                       messages=[dict(role="user", content=MESSAGE)],
                                       max_tokens=12, temperature=0).choices[0].message.content
    page = browser.new_page()
    page.goto(server)
    expect(page.locator("#model")).to_have_text("SmolLM2-135M-Instruct")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    # count the changes to the log (one record each, however many arrive at once): streamed text
    # comes in pieces
    page.evaluate("""window.updates = 0; new MutationObserver(records => window.updates += records.length).observe(
        document.getElementById('log'), {childList: true, subtree: true, characterData: true})""")
    page.fill("#input", MESSAGE)
    page.press("#input", "Enter")
    expect(page.locator(".msg.user")).to_have_text(MESSAGE)
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    assert page.locator(".msg.assistant").text_content() == want and want
    assert page.evaluate("window.updates") > 8  # 12 tokens: about one change each
