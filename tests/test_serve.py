"""The live-edit service on a tiny model: ledger, revert-any, restart, auth, bad input, streaming.

The real-model scenario (Paris -> Rome -> restart -> revert) is in test_serve_scenario.py.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

import lmpatch
from facts import REQS
from lmpatch.serve.app import GENERATION_HEADER, create_app
from lmpatch.serve.ledger import LedgerMismatchError
from lmpatch.serve.service import Service, ServiceConfig
from tiny import tiny_model

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROME = dict(layer=1, v_steps=3, template_lengths=((3, 2),), mom2_adjustment=False)


def _service(tmp_path, **kw) -> Service:
    return Service(tiny_model("llama"), ServiceConfig(ledger=tmp_path / "ledger", token=TOKEN, **kw))


@pytest.fixture()
def client(tmp_path):
    service = _service(tmp_path)
    with TestClient(create_app(service)) as c:
        c.service = service
        yield c
    service.close()


def _edit(client, request, method="rome", hparams=ROME, **extra) -> dict:
    r = client.post("/v1/edits", json={"requests": request.to_dict(), "method": method, "hparams": hparams, **extra},
                    headers=AUTH)
    assert r.status_code == 202, r.text
    return _wait(client, r.json()["id"])


def _wait(client, edit_id, until=("committed", "failed", "reverted", "cancelled")) -> dict:
    for _ in range(600):
        rec = client.get(f"/v1/edits/{edit_id}").json()
        if rec["status"] in until:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"edit {edit_id} stuck: {rec}")


def _complete(client, prompt="The Eiffel Tower is located in the city of", **kw):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], int(r.headers[GENERATION_HEADER])


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_greedy_completion_equals_lmpatch_generate(client):
    text, gen = _complete(client)
    assert gen == 0
    from lmpatch.eval.scoring import generate

    assert text == generate(tiny_model("llama"), ["The Eiffel Tower is located in the city of"], max_new_tokens=4)[0]


def test_an_edit_commits_swaps_in_and_is_seen_by_the_next_request(client):
    before, _ = _complete(client)
    rec = _edit(client, REQS[0])
    assert rec["status"] == "committed" and rec["generation_committed"] == 1, rec
    assert {"compute_s", "check_s", "swap_s"} <= set(rec["timings"])
    assert rec["checks"]["requests"][0]["prompt"] == REQS[0].prompt
    after, gen = _complete(client)
    assert gen == 1
    edited = lmpatch.Patch.load(client.service.ledger.get(rec["id"]).patch_file)
    model = tiny_model("llama")
    with edited.applied(model):
        from lmpatch.eval.scoring import generate

        assert after == generate(model, [REQS[0].prompt], max_new_tokens=4)[0]
    assert client.get("/v1/models").json()["data"][0]["edits"] == 1


def test_reverting_the_middle_of_three_edits_on_one_layer_is_bit_identical_to_first_plus_third(client):
    ids = [_edit(client, r)["id"] for r in REQS]
    r = client.delete(f"/v1/edits/{ids[1]}", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "reverted", r.text
    assert int(r.headers[GENERATION_HEADER]) == 4
    reference = tiny_model("llama")
    for i in (0, 2):
        lmpatch.Patch.load(client.service.ledger.get(ids[i]).patch_file).apply(reference)
    served, twin = _state(client.service.model), _state(client.service.state.twin)
    for name, value in _state(reference).items():
        assert torch.equal(served[name], value), name
        assert torch.equal(twin[name], value), name
    assert [e["id"] for e in client.get("/v1/edits?status=committed").json()["data"]] == [ids[2], ids[0]]


def test_a_restart_rebuilds_the_state_from_the_ledger_and_checks_it(tmp_path):
    service = _service(tmp_path)
    with TestClient(create_app(service)) as c:
        first = _edit(c, REQS[0])
        second = _edit(c, REQS[1])
        c.delete(f"/v1/edits/{first['id']}", headers=AUTH)
        expected = _state(service.model)
        gen = service.state.generation
    service.close()

    again = _service(tmp_path)
    assert again.state.generation == gen == 3
    assert all(torch.equal(_state(again.model)[k], v) for k, v in expected.items())
    again.close()

    # a committed patch file that changed on disk is refused at start
    path = tmp_path / "ledger" / "patches" / f"{second['id']}.lmpatch"
    path.write_bytes(path.read_bytes()[:-1] + b" ")
    with pytest.raises(LedgerMismatchError, match="differs from the one committed"):
        _service(tmp_path)


def test_a_ledger_of_another_model_is_refused(tmp_path):
    _service(tmp_path).close()
    with pytest.raises(LedgerMismatchError, match="was made for model"):
        Service(tiny_model("gpt2"), ServiceConfig(ledger=tmp_path / "ledger", token=TOKEN))


def test_writes_need_the_token_and_reads_can_be_protected(client, tmp_path):
    body = {"requests": REQS[0].to_dict(), "hparams": ROME}
    assert client.post("/v1/edits", json=body).status_code == 401
    r = client.post("/v1/edits", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert client.delete("/v1/edits/ed_x").status_code == 401
    assert client.post("/v1/snapshots", json={}).status_code == 401
    assert client.get("/v1/edits").status_code == 200

    guarded = _service(tmp_path / "guarded", protect_reads=True)
    with TestClient(create_app(guarded)) as c:
        assert c.get("/v1/edits").status_code == 401
        assert c.post("/v1/completions", json={"prompt": "Hi"}).status_code == 401
        assert c.get("/v1/edits", headers=AUTH).status_code == 200
    guarded.close()


@pytest.mark.parametrize("body, code, needle", [
    ({"requests": {"prompt": "Paris is", "subject": "Rome", "target_new": "x"}}, 400, "does not occur"),
    ({"requests": {"prompt": "Paris is"}}, 400, "missing"),
    ({"requests": [], "method": "rome"}, 422, "at least one"),
    ({"requests": REQS[0].to_dict(), "method": "nope"}, 400, "Unknown method"),
    ({"requests": REQS[0].to_dict(), "hparams": {"layerz": 1}}, 400, "layerz"),
    ({"requests": REQS[0].to_dict(), "expected_generation": 7}, 409, "generation 0"),
    ({"requests": REQS[0].to_dict(), "surprise": 1}, 422, "surprise"),
    ("not json", 422, "The body is not valid JSON"),
    ('{"requests": {"prompt": "x",', 422, "The body is not valid JSON"),
    ({"requests": "text"}, 422, "requests: Input should be"),
])
def test_bad_edit_requests_get_one_json_error(client, body, code, needle):
    kw = {"json": body} if not isinstance(body, str) else {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}}
    r = client.post("/v1/edits", **({"headers": AUTH} | kw))
    assert r.status_code == code, r.text
    assert needle in r.json()["error"]["message"]
    assert "dict[" not in r.json()["error"]["message"]  # no pydantic union branch names
    assert client.get("/health").json()["status"] == "ok"


def test_the_wrong_content_type_and_a_mistyped_status_are_named(client, tmp_path):
    # curl -d without -H sends a form type: the JSON inside is never read, so say so.
    r = client.post("/v1/completions", content=b'{"prompt": "Hi"}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"], r.text
    r = client.post("/v1/patches", files={"file": ("x.lmpatch", b"data")}, headers=AUTH)
    assert r.status_code == 415 and "--data-binary" in r.json()["error"]["message"], r.text
    r = client.post("/v1/patches", content=b"garbage", headers=AUTH)
    assert r.status_code == 422 and "the uploaded file" in r.json()["error"]["message"], r.text
    assert "upload-" not in r.json()["error"]["message"]  # the server's own file names stay private
    r = client.get("/v1/edits?status=commited")
    assert r.status_code == 400 and "committed" in r.json()["error"]["message"], r.text
    r = client.get("/v1/edits?limit=0")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_query", r.text


def test_bad_generation_requests_and_unknown_edits(client):
    assert client.post("/v1/completions", json={"prompt": ["a", "b"]}).status_code == 400
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 0}).status_code == 422
    assert client.post("/v1/completions", json={"prompt": "a", "n": 2}).status_code == 422
    assert client.post("/v1/completions", json={}).status_code == 422
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 422
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "Hi"}]}).status_code == 422
    assert client.get("/v1/edits/ed_nope").status_code == 404
    assert client.delete("/v1/edits/ed_nope", headers=AUTH).status_code == 404
    assert client.get("/v1/edits/ed_nope/patch").status_code == 404
    big = client.post("/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "--max-body-mb" in big.json()["error"]["message"]
    assert client.get("/nowhere").status_code == 404


def test_chat_uses_the_chat_template(client):
    from lmpatch.eval.scoring import generate

    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    model = tiny_model("llama")
    chat = lmpatch.wrap_model(model.model, model.tokenizer, chat=True)
    assert message == {"role": "assistant", "content": generate(chat, ["Hi"], max_new_tokens=5)[0]}
    # OpenAI's list form of the same content gets the same answer.
    parts = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}], "max_tokens": 5})
    assert parts.status_code == 200 and parts.json()["choices"][0]["message"] == message, parts.text
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert client.post("/v1/chat/completions", json={"messages": [image]}).status_code == 422
    assert client.post("/v1/completions", json={"prompt": "Hi", "stream": "yes"}).status_code == 422


def test_streaming_sends_the_same_text_as_one_answer(client):
    whole, _ = _complete(client, max_tokens=6)
    r = client.post("/v1/completions", json={"prompt": "The Eiffel Tower is located in the city of", "max_tokens": 6,
                                             "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_strings_cut_the_answer(client):
    whole, _ = _complete(client, max_tokens=8)
    assert len(whole.strip()) >= 3, whole  # the seeded tiny model says enough to cut
    stop = whole.strip()[1:3]
    text, _ = _complete(client, max_tokens=8, stop=[stop])
    assert stop not in text and whole.startswith(text)


def test_idempotency_key_and_revert_rules(client):
    body = {"requests": REQS[0].to_dict(), "hparams": ROME}
    headers = {**AUTH, "Idempotency-Key": "k1"}
    first = client.post("/v1/edits", json=body, headers=headers)
    again = client.post("/v1/edits", json=body, headers=headers)
    assert first.status_code == 202 and again.status_code == 200 and first.json()["id"] == again.json()["id"]
    rec = _wait(client, first.json()["id"])
    assert len(client.get("/v1/edits").json()["data"]) == 1
    # A retry after a timeout, with the generation it first read: its edit back, not "stale".
    pinned = client.post("/v1/edits", json={**body, "expected_generation": 0}, headers=headers)
    assert pinned.status_code == 200 and pinned.json()["id"] == rec["id"], pinned.text
    # The same key for another request is refused, never answered with the first edit's record.
    other = {**body, "requests": REQS[1].to_dict()}
    r = client.post("/v1/edits", json=other, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
    assert "requests differ" in r.json()["error"]["message"]
    assert len(client.get("/v1/edits").json()["data"]) == 1
    assert client.delete(f"/v1/edits/{rec['id']}", headers=AUTH).status_code == 200
    r = client.delete(f"/v1/edits/{rec['id']}", headers=AUTH)
    assert r.status_code == 409 and "reverted" in r.json()["error"]["message"]


def test_patches_download_and_upload_and_a_foreign_patch_is_refused(client, tmp_path):
    rec = _edit(client, REQS[0])
    data = client.get(f"/v1/edits/{rec['id']}/patch").content
    client.delete(f"/v1/edits/{rec['id']}", headers=AUTH)
    up = client.post("/v1/patches", content=data, headers={**AUTH, "Idempotency-Key": "up-1"})
    assert up.status_code == 202, up.text
    done = _wait(client, up.json()["id"])
    assert done["status"] == "committed" and done["kind"] == "upload" and done["patch_id"] == rec["patch_id"]
    retry = client.post("/v1/patches", content=data, headers={**AUTH, "Idempotency-Key": "up-1"})
    assert retry.status_code == 200 and retry.json()["id"] == done["id"], retry.text
    twice = client.post("/v1/patches", content=data, headers=AUTH)  # applied already: refused now, not failed later
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "already_applied", twice.text
    patches = client.service.ledger.folder / "patches"
    assert len(list(patches.glob("upload-*.lmpatch"))) == 1  # the committed upload's; the refused ones are gone
    foreign = lmpatch.edit(tiny_model("gpt2"), REQS[0], "ft-m", steps=2)
    foreign.save(tmp_path / "f.lmpatch")
    r = client.post("/v1/patches", content=(tmp_path / "f.lmpatch").read_bytes(), headers=AUTH)
    assert r.status_code == 422 and "made for model" in r.json()["error"]["message"]
    r = client.post("/v1/patches", content=b"garbage", headers=AUTH)
    assert r.status_code == 422


def test_an_edit_the_model_cannot_read_is_refused_at_once(client):
    long = {**REQS[0].to_dict(), "prompt": "word " * 600 + REQS[0].prompt}
    r = client.post("/v1/edits", json={"requests": long, "hparams": ROME}, headers=AUTH)
    assert r.status_code == 400 and "positions" in r.json()["error"]["message"], r.text
    assert client.get("/v1/edits").json()["data"] == []  # nothing queued to run away


def test_a_misspelt_request_field_is_refused_not_dropped(client):
    typo = {**REQS[0].to_dict(), "rephrse": ["Where is it?"]}
    r = client.post("/v1/edits", json={"requests": typo, "hparams": ROME}, headers=AUTH)
    assert r.status_code == 400 and "did you mean 'rephrase'" in r.json()["error"]["message"], r.text


def test_a_failed_edit_is_recorded_and_the_service_goes_on(client, monkeypatch):
    r = client.post("/v1/edits", json={"requests": REQS[0].to_dict(), "hparams": {**ROME, "layer": 99}}, headers=AUTH)
    assert r.status_code == 400 and "Layer 99 does not exist" in r.json()["error"]["message"]  # refused at once

    def fails(*_args, **_kwargs):
        raise lmpatch.LmpatchError("the method gave up")

    with monkeypatch.context() as m:
        m.setattr(lmpatch, "edit", fails)  # what the worker calls; the request itself is valid
        bad = _edit(client, REQS[0])
    assert bad["status"] == "failed" and bad["error"] == "the method gave up"
    assert client.get("/v1/models").json()["data"][0]["generation"] == 0
    assert _edit(client, REQS[0])["status"] == "committed"


def test_a_failed_upload_keeps_its_record_not_its_file(client, tmp_path):
    from lmpatch.patch import Patch, WeightDelta

    model = client.service.model
    stray = Patch(parts=[WeightDelta("model.layers.99.mlp.down_proj.weight", left=torch.ones(8, 1),
                                     right=torch.ones(1, 8))],
                  method="rome", model_fingerprint=model.fingerprint, model_name=model.name)
    stray.save(tmp_path / "stray.lmpatch")
    up = client.post("/v1/patches", content=(tmp_path / "stray.lmpatch").read_bytes(), headers=AUTH)
    assert up.status_code == 202, up.text
    failed = _wait(client, up.json()["id"])
    assert failed["status"] == "failed" and "layers.99" in failed["error"]
    assert not list((client.service.ledger.folder / "patches").glob("upload-*"))


def test_a_snapshot_is_a_checkpoint_of_the_current_state(client):
    _edit(client, REQS[0])
    r = client.post("/v1/snapshots", json={"name": "snap"}, headers=AUTH)
    assert r.status_code == 201, r.text
    loaded = lmpatch.load_model(r.json()["path"])
    served = _state(client.service.model)
    assert all(torch.equal(v, served[k]) for k, v in loaded.model.state_dict().items())
    assert client.post("/v1/snapshots", json={"name": "snap"}, headers=AUTH).status_code == 409
    assert client.post("/v1/snapshots", json={"name": "../x"}, headers=AUTH).status_code == 422
    for name in (".", ".."):  # the snapshots folder itself, or the ledger's
        assert client.post("/v1/snapshots", json={"name": name}, headers=AUTH).status_code == 422, name
    grace = _edit(client, REQS[1], method="grace", hparams={})  # a codebook: no plain checkpoint holds it
    r = client.post("/v1/snapshots", json={"name": "with-grace"}, headers=AUTH)
    assert r.status_code == 409 and f"{grace['id']} (grace)" in r.json()["error"]["message"], r.text
    assert not (client.service.ledger.folder / "snapshots" / "with-grace").exists()


def test_the_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>lmpatch</title>" in r.text


def test_every_response_says_the_generation(client):
    for r in (client.get("/health"), client.get("/v1/edits/ed_nope"), client.get("/"),
              client.post("/v1/edits", json={})):
        assert r.headers[GENERATION_HEADER] == "0", r


def test_a_swap_waits_for_the_request_in_flight_and_goes_before_later_ones():
    import threading

    from lmpatch.serve.state import FairLock

    lock, order = FairLock(), []

    def hold(name, delay, work):
        time.sleep(delay)
        with lock.hold():
            time.sleep(work)
            order.append(name)

    threads = [threading.Thread(target=hold, args=a) for a in (("request 1", 0, 0.3), ("swap", 0.1, 0),
                                                                ("request 2", 0.2, 0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["request 1", "swap", "request 2"]


def test_requests_are_served_while_an_edit_is_computed(client):
    r = client.post("/v1/edits", json={"requests": REQS[0].to_dict(), "method": "ft-m", "hparams": {"steps": 400}},
                    headers=AUTH)
    edit_id = r.json()["id"]
    _wait(client, edit_id, until=("running", "committed"))
    served_while_running = 0
    while client.get(f"/v1/edits/{edit_id}").json()["status"] == "running":
        _, gen = _complete(client)
        assert gen in (0, 1)  # the edit may commit between the status read and this answer
        served_while_running += gen == 0
    assert served_while_running >= 1
    assert _wait(client, edit_id)["status"] == "committed"
    assert _complete(client)[1] == 1


def test_the_official_openai_client_reads_every_answer(client):
    """OpenAI-compatible, checked with OpenAI's own client (plain, streamed, chat)."""
    import openai  # a test dependency, installed by `make`
    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key=TOKEN, http_client=client)
    whole, _ = _complete(client, max_tokens=5)
    done = api.completions.create(model="any", prompt="The Eiffel Tower is located in the city of", max_tokens=5)
    assert done.choices[0].text == whole and done.usage.completion_tokens >= 1
    streamed = api.completions.create(model="any", prompt="The Eiffel Tower is located in the city of", max_tokens=5,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole
    chat = api.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    pieces = api.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == chat.choices[0].message.content
    assert [m.id for m in api.models.list()] == [client.service.model.name]


def test_concurrent_requests_decode_as_one_batch_each_with_its_own_limits(client):
    """Requests that queue while the model is busy are decoded together; each row keeps
    its own max_tokens and stop strings, and (greedy) says what it says alone."""
    import threading

    from lmpatch.serve.generation import Sampling

    prompts = ["The Eiffel Tower is located in the city of", "Mount Fuji is in", "The capital of Japan is",
               "My favourite colour is"]
    limits = [3, 5, 7, 2]
    alone = [client.service.batcher.submit(lambda m, p=p: p, Sampling(max_tokens=n)).text()
             for p, n in zip(prompts, limits)]
    results, batch_sizes = {}, []
    real_run = client.service.batcher._run

    def counting_run(batch, model, generation):
        batch_sizes.append(len(batch))
        return real_run(batch, model, generation)

    client.service.batcher._run = counting_run

    def ask(i):
        job = client.service.batcher.submit(lambda m: prompts[i], Sampling(max_tokens=limits[i]))
        results[i] = (job.text(), job.completion_tokens, job.generation)

    with client.service.state.serving():  # the model is busy: the requests queue up
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert batch_sizes == [4]
    for i in range(4):
        text, n, gen = results[i]
        assert text == alone[i] and n <= limits[i] and gen == 0, (i, text, alone[i])


def test_deleting_a_queued_edit_cancels_it_and_it_is_never_computed(client):
    slow = client.post("/v1/edits", json={"requests": REQS[0].to_dict(), "method": "ft-m", "hparams": {"steps": 300}},
                       headers=AUTH).json()
    queued = client.post("/v1/edits", json={"requests": REQS[1].to_dict(), "hparams": ROME}, headers=AUTH).json()
    r = client.delete(f"/v1/edits/{queued['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert _wait(client, slow["id"])["status"] == "committed"
    time.sleep(0.2)
    assert client.get(f"/v1/edits/{queued['id']}").json()["status"] == "cancelled"
    assert client.get("/v1/models").json()["data"][0]["generation"] == 1


def test_chat_messages_are_rewritten_by_memories_like_prompts():
    """A retrieval memory sees the chat's last user message as it sees a prompt."""
    model = tiny_model("llama")
    chat = lmpatch.wrap_model(model.model, model.tokenizer, chat=True)
    patch = lmpatch.edit(chat, REQS[0], "memprompt")
    with patch.applied(chat):
        prompt = chat.format_prompts([REQS[0].prompt])[0]
        messages = chat.format_messages([{"role": "user", "content": REQS[0].prompt}])
    assert messages == prompt and REQS[0].target_new in messages


def test_the_quick_check_answers_the_edit_and_its_locality_probes(client):
    from dataclasses import replace

    probe = {"prompt": "The capital of Japan is", "answer": "Tokyo"}
    request = replace(REQS[0], locality=(probe, {"prompt": "Mount Fuji is in", "answer": "Japan"}))
    checks = _edit(client, request)["checks"]
    [row] = checks["requests"]
    assert row["prompt"] == REQS[0].prompt and isinstance(row["hit"], bool)
    assert [p["prompt"] for p in row["locality"]] == [probe["prompt"], "Mount Fuji is in"]
    for p in row["locality"]:
        assert p["unchanged"] == (p["before"] == p["after"]) and p["before"]
    assert checks["locality"] == sum(p["unchanged"] for p in row["locality"]) / 2


def test_without_a_token_one_is_made_kept_owner_only_and_reused(tmp_path):
    import stat

    config = ServiceConfig(ledger=tmp_path / "ledger")
    first = Service(tiny_model("llama"), config)
    token = first.token
    first.close()
    path = tmp_path / "ledger" / "token"
    assert path.read_text().strip() == token and len(token) >= 24
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Service(tiny_model("llama"), config)
    assert again.token == token
    again.close()


def test_the_ledger_commits_inside_the_swap_so_no_request_meets_the_old_model():
    """A client that reads "committed" must be answered by the edited model: the ledger's
    transaction runs after the serving copy took the patch and before any request runs
    again; a failed transaction takes the patch off again. A revert commits first, then
    removes the patch, in the same single hold."""
    from lmpatch.serve.state import ServedState

    state = ServedState(tiny_model("llama"))
    patch = lmpatch.edit(state.twin, REQS[0], "rome", **ROME)
    seen = []

    def commit() -> int:
        seen.append(patch.patch_id in state.model.stack)
        return 1

    assert state.swap_in(patch, commit) == 1 and seen == [True] and state.generation == 1

    def failing() -> int:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        state.swap_out(patch.patch_id, failing)
    assert patch.patch_id in state.model.stack and state.generation == 1  # nothing changed
    assert state.swap_out(patch.patch_id, lambda: 2) == 2 and patch.patch_id not in state.model.stack
    with pytest.raises(RuntimeError):
        state.swap_in(patch, failing)
    assert patch.patch_id not in state.model.stack and state.generation == 2


def test_an_edit_that_stops_the_service_every_time_is_failed_not_requeued_forever(tmp_path):
    """A kill while computing requeues the edit; after MAX_RESTARTS such kills it is failed."""
    from lmpatch.serve.ledger import MAX_RESTARTS, Ledger

    ledger = Ledger(tmp_path / "ledger")
    rec, _ = ledger.add(actor="t", kind="edit", method="rome", hparams={}, requests=[REQS[0].to_dict()])
    for restart in range(1, MAX_RESTARTS):
        assert ledger.start(rec.id, "computing")  # ... and the process is killed here
        assert [r.id for r in ledger.interrupted()] == [rec.id]
        again = ledger.get(rec.id)
        assert again.status == "queued" and again.timings["restarts"] == restart
    assert ledger.start(rec.id, "computing")
    assert ledger.interrupted() == []
    failed = ledger.get(rec.id)
    assert failed.status == "failed" and f"{MAX_RESTARTS} times" in failed.error
    ledger.close()
