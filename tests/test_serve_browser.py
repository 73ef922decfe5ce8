"""The service's web page in a real browser: Debian's chromium driven by Playwright (never a
browser Playwright downloads). On the real SmolLM2: ask -> Paris, make the edit from the
form, watch it commit, ask again -> Rome, revert from the ledger table -> Paris.
The final screenshot is kept as docs/serve-page.png when LMPATCH_SCREENSHOT is set."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright  # a test dependency (installed by `make`)

from lmpatch.serve.process import ServerProcess

TOKEN = "browser-token"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed for the browser test: apt-get install chromium (make does it)"
    return path


def _ask(page) -> str:
    page.fill("#max", "6")
    page.click("#ask")
    page.wait_for_function("document.getElementById('answer').dataset.done === '1'", timeout=120_000)
    text = page.inner_text("#answer")
    page.evaluate("delete document.getElementById('answer').dataset.done")
    return text


@pytest.mark.model
def test_the_page_asks_edits_and_reverts_in_a_real_browser(tmp_path):
    with ServerProcess(ledger=tmp_path / "ledger", token=TOKEN) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        assert "Paris" in _ask(page)

        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        page.click("#edit")
        page.wait_for_selector("#edit-status.ok", timeout=300_000)
        assert "committed" in page.inner_text("#edit-status")
        answer = _ask(page)
        assert "Rome" in answer and "Paris" not in answer, answer
        page.wait_for_selector("button[data-revert]")
        if os.environ.get("LMPATCH_SCREENSHOT"):
            page.screenshot(path=str(Path(__file__).resolve().parent.parent / "docs" / "serve-page.png"), full_page=True)

        page.click("button[data-revert]")
        page.wait_for_function("document.querySelector('#ledger .status').textContent.startsWith('reverted')",
                               timeout=120_000)
        assert "Paris" in _ask(page)
        browser.close()
