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


FT = {"method": "ft-m", "hparams": {"steps": 100}}  # long enough on the tiny model to be killed inside
KILLS = 10


def _reference_fingerprint(model_dir, ledger_rows: list[dict]) -> str:
    import lmpatch
    from lmpatch.serve.state import state_fingerprint

    model = lmpatch.load_model(str(model_dir))
    for row in sorted(ledger_rows, key=lambda r: r["commit_seq"]):
        lmpatch.Patch.load(row["patch_file"]).apply(model)
    return state_fingerprint(model)


def _poll_until(ledger, edit_id: str, states: tuple[str, ...], timeout: float = 30.0) -> None:
    """Read the ledger file (as the server writes it) until the edit reaches one of ``states``."""
    import sqlite3

    db = sqlite3.connect(ledger / "ledger.sqlite3", timeout=5)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            row = db.execute("SELECT status FROM edits WHERE id = ?", (edit_id,)).fetchone()
            if row and row[0] in states:
                return
            time.sleep(0.001)
    finally:
        db.close()
    raise AssertionError(f"edit {edit_id} never reached {states}")


def _seconds_running(ledger, edit_id: str) -> float:
    """How long the edit stayed ``running`` in the ledger: the window a kill must land in.
    Measured, because it differs between machines (and fell below the fixed sleep once)."""
    _poll_until(ledger, edit_id, ("running", "committed", "failed"))
    start = time.perf_counter()
    _poll_until(ledger, edit_id, ("committed", "failed"), timeout=120)
    return time.perf_counter() - start


def _status_at_kill(ledger, edit_id: str) -> str:
    from lmpatch.serve.ledger import Ledger

    db = Ledger(ledger)
    try:
        return db.get(edit_id).status
    finally:
        db.close()


@pytest.mark.slow
def test_sigkill_during_edits_and_reverts_loses_nothing_and_invents_nothing(tmp_path):
    """10 kills inside an edit and 10 inside a revert, each followed by a restart. Every
    edit the service accepted ends committed (or reverted, if a revert was asked), the
    ledger's live edits are exactly those, and the served state equals the base model
    plus their patches in order (the start-up check, and the reference computed here)."""
    import random
    import threading

    from lmpatch.serve.ledger import Ledger
    from tiny import tiny_model

    model_dir = tmp_path / "tiny"
    m = tiny_model("llama")
    m.model.save_pretrained(model_dir)
    m.tokenizer.save_pretrained(model_dir)
    ledger = tmp_path / "ledger"
    args = ("--model", str(model_dir))
    rng = random.Random(0)
    accepted: list[str] = []
    reverted: set[str] = set()
    at_kill: dict[str, list[str]] = {"edit": [], "revert": []}
    server = ServerProcess(ledger=ledger, token=TOKEN, args=args).start()
    try:
        warm = {"prompt": "A calibration fact is about", "subject": "A calibration fact", "target_new": "timing"}
        r = httpx.post(f"{server.url}/v1/edits", json={"requests": warm, **FT}, headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        accepted.append(r.json()["id"])
        window = _seconds_running(ledger, accepted[-1])  # this machine's edit time, not a guess
        for trial in range(KILLS):
            request = {"prompt": f"Fact number {trial} is about", "subject": f"Fact number {trial}",
                       "target_new": f"topic {trial}"}
            r = httpx.post(f"{server.url}/v1/edits", json={"requests": request, **FT}, headers=AUTH, timeout=30)
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])
            _poll_until(ledger, accepted[-1], ("running", "committed", "failed"))
            time.sleep(rng.uniform(0.0, 0.6 * window))  # the edit is still computing (loading was before)
            server.kill()
            at_kill["edit"].append(_status_at_kill(ledger, accepted[-1]))
            server = ServerProcess(ledger=ledger, token=TOKEN, args=args).start()
            assert _wait(server.url, accepted[-1])["status"] == "committed"

            victim = rng.choice([e for e in accepted if e not in reverted])
            threading.Thread(target=lambda: httpx.delete(f"{server.url}/v1/edits/{victim}", headers=AUTH,
                                                         timeout=30), daemon=True).start()
            reverted.add(victim)
            _poll_until(ledger, victim, ("reverting", "reverted"))
            server.kill()  # at once: a revert of the tiny model takes milliseconds
            at_kill["revert"].append(_status_at_kill(ledger, victim))
            server = ServerProcess(ledger=ledger, token=TOKEN, args=args).start()
            rec = _wait(server.url, victim, done=("reverted", "committed"))
            if rec["status"] == "committed":  # killed before the DELETE reached the ledger: ask again
                assert httpx.delete(f"{server.url}/v1/edits/{victim}", headers=AUTH, timeout=60).status_code == 200
        rows = httpx.get(f"{server.url}/v1/edits?limit=500", timeout=30).json()["data"]
        served = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]
    finally:
        server.stop()

    print(f"an edit ran {window:.2f} s; ledger status of the edit at each kill:",
          {k: sorted(v) for k, v in at_kill.items()})
    assert at_kill["edit"].count("running") >= 5  # the kills really landed inside edits
    assert at_kill["revert"].count("reverting") >= 3  # ... and inside reverts
    status = {r["id"]: r["status"] for r in rows}
    assert sorted(status) == sorted(accepted)  # nothing invented, nothing lost
    for edit_id in accepted:
        assert status[edit_id] == ("reverted" if edit_id in reverted else "committed"), (edit_id, status[edit_id])
    db = Ledger(ledger)
    live = [{"commit_seq": r.commit_seq, "patch_file": r.patch_file} for r in db.live()]
    assert served["edits"] == len(live) == len(accepted) - len(reverted) == KILLS + 1 - len(reverted)
    assert served["state_fingerprint"] == db.state_fingerprint == _reference_fingerprint(model_dir, live)
    db.close()
