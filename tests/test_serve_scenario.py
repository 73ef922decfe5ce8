"""The live-edit service end to end: the real ``lmpatch serve`` command on the real SmolLM2.

Ask -> Paris; edit to Rome (ROME, default settings) -> the next answer is Rome; restart
-> still Rome; revert -> Paris again; an edit without the token -> 401. Then the crash
test: the server is SIGKILLed in the middle of an edit and of a revert, restarted, and
the ledger and the model must agree with no committed edit lost and none invented.
"""
from __future__ import annotations

import time

import httpx
import pytest

from lmpatch.serve.process import ServerProcess

PROMPT = "The Eiffel Tower is located in the city of"
EDIT = {"prompt": PROMPT, "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}
TOKEN = "scenario-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _answer(url: str) -> tuple[str, int]:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 6}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], int(r.headers["X-Lmpatch-Generation"])


def _wait(url: str, edit_id: str, done=("committed", "failed", "reverted")) -> dict:
    deadline = time.time() + 600
    while time.time() < deadline:
        rec = httpx.get(f"{url}/v1/edits/{edit_id}", timeout=30).json()
        if rec["status"] in done:
            return rec
        time.sleep(0.3)
    raise AssertionError(f"edit {edit_id} did not finish: {rec}")


@pytest.mark.model
def test_ask_edit_restart_revert_on_the_real_model(tmp_path):
    ledger = tmp_path / "ledger"
    with ServerProcess(ledger=ledger, token=TOKEN) as server:
        text, gen = _answer(server.url)
        assert "Paris" in text and gen == 0, text
        denied = httpx.post(f"{server.url}/v1/edits", json={"requests": EDIT}, timeout=30)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
        r = httpx.post(f"{server.url}/v1/edits", json={"requests": EDIT, "method": "rome"}, headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        rec = _wait(server.url, r.json()["id"])
        assert rec["status"] == "committed" and rec["checks"]["efficacy"] == 1.0, rec
        text, gen = _answer(server.url)
        assert "Rome" in text and "Paris" not in text and gen == 1, text

    with ServerProcess(ledger=ledger, token=TOKEN) as server:  # a restart rebuilds the edit from the ledger
        text, gen = _answer(server.url)
        assert "Rome" in text and gen == 1, text
        r = httpx.delete(f"{server.url}/v1/edits/{rec['id']}", headers=AUTH, timeout=120)
        assert r.status_code == 200 and r.json()["status"] == "reverted", r.text
        text, gen = _answer(server.url)
        assert "Paris" in text and gen == 2, text
