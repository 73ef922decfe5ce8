"""Scoring, metrics and the single-edit runner (lmpatch.eval)."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch

import lmpatch
from lmpatch.errors import LmpatchError, PatchError
from lmpatch.eval import metrics as M
from lmpatch.eval.metrics import RequestScores, evaluate, evaluate_request, exact_match, request_values, summarize
from lmpatch.eval.records import read_records
from lmpatch.eval.runner import ModelState, run_single
from lmpatch.eval.scoring import TargetScore, encode_pairs, generate, generate_ids, score_targets
from lmpatch.request import EditRequest, Probe
from lmpatch.tokens import encode, prompt_target

PAIRS = [
    ("The Eiffel Tower is located in the city of", "Rome"),
    ("Danielle Darrieux's mother tongue is", "English"),
    ("Toko Yasuda, the", "piano"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Autonomous University of Madrid, which is located in", "Sweden"),
    ("What is the twin city of Lyon? It is", "Beirut"),
    ("Apple A5 was created by", "Google"),
    ("The capital of France is", "Paris"),
    ("In Wales, the language spoken is", "Welsh language"),
]


# --------------------------------------------------------------------------- fixtures


def byte_tokenizer():
    """A self-contained byte-level tokenizer (one token per byte) for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = i + 2
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=0.2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    return lmpatch.wrap_model(model, tok, name="tiny-llama")


@pytest.fixture(scope="module")
def real():
    return lmpatch.load_model()


class DeltaPatch:
    """Stand-in for lmpatch.patch.Patch: adds a delta to one weight, restores it exactly."""

    method = "dummy"

    def __init__(self, param: str, delta: torch.Tensor, exact: bool = True):
        self.param, self.delta, self.exact = param, delta, exact
        self._saved = None

    def apply(self, model):
        p = model.model.get_parameter(self.param)
        self._saved = p.detach().clone()
        with torch.no_grad():
            p.add_(self.delta)

    def revert(self, model):
        p = model.model.get_parameter(self.param)
        with torch.no_grad():
            if self.exact:
                p.copy_(self._saved)
            else:  # the classic inexact revert: float residue stays behind
                p.add_(self.delta * 1.001)

    @contextmanager
    def applied(self, model):
        self.apply(model)
        try:
            yield self
        finally:
            self.revert(model)


def head_patch(model, scale: float = 5.0, seed: int = 1) -> DeltaPatch:
    w = model.model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    return DeltaPatch("lm_head.weight", scale * torch.randn(w.shape, generator=g))


def tiny_requests(n: int = 3, case_ids: bool = True) -> list[EditRequest]:
    out = []
    for i in range(n):
        out.append(
            EditRequest(
                prompt=f"The city number {i} is in",
                subject=f"The city number {i}",
                target_new="Rome",
                target_true="Paris",
                rephrase=[f"Where is city {i}? It is in", "Some city is in"],
                locality=[
                    Probe("The capital of Japan is", "Tokyo"),
                    Probe(f"The city number {i} has a river called the", "Seine", "other_attribution"),
                    Probe(f"The city number {i} is in Rome. The capital of Japan is", "Tokyo",
                          "distracting_neighborhood"),
                ],
                portability=[
                    Probe(f"City {i} speaks", "Italian"),
                    Probe(f"The town number {i} is in", "Rome", "subject_alias"),
                    Probe(f"City {i} is in Rome; Rome contains the city number", f"{i}", "reversed_relation"),
                    Probe(f"The language of city {i} is", "Italian", "one_hop"),
                ],
                case_id=f"c{i}" if case_ids else None,
            )
        )
    return out


def assert_same_scores(a: list[TargetScore], b: list[TargetScore], atol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.target == y.target
        assert x.argmax == y.argmax
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)


def naive_scores(model, prompt: str, target: str) -> tuple[list[float], list[int], list[int]]:
    """Full-model forward on one unpadded sequence, then read every target position."""
    pt = prompt_target(model.tokenizer, model.format_prompt(prompt), target)
    ids = torch.tensor([list(pt.prompt_ids) + list(pt.target_ids)])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    p = len(pt.prompt_ids)
    rows = torch.arange(p - 1, p - 1 + len(pt.target_ids))
    tgt = torch.tensor(pt.target_ids)
    return logp[rows, tgt].tolist(), logp[rows].argmax(-1).tolist(), list(pt.target_ids)


# --------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny_gpt2():
    """Absolute position embeddings: left padding is wrong here unless position ids follow the mask."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=256,
                     pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=0.2)
    return lmpatch.wrap_model(AutoModelForCausalLM.from_config(cfg), tok, name="tiny-gpt2")


@pytest.mark.parametrize("arch", ["tiny", "tiny_gpt2"])
def test_batch_size_and_padding_side_invariance_tiny(arch, request):
    model = request.getfixturevalue(arch)
    ref = score_targets(model, PAIRS, batch_size=1)
    for bs, side in [(8, "right"), (8, "left"), (3, "left"), (2, "right")]:
        assert_same_scores(ref, score_targets(model, PAIRS, batch_size=bs, padding_side=side))
    for (prompt, target), s in zip(PAIRS, ref):
        lp, am, _ = naive_scores(model, prompt, target)
        assert s.argmax == am and max(abs(a - b) for a, b in zip(s.logprobs, lp)) < 1e-4


def test_scores_match_naive_full_forward_tiny(tiny):
    got = score_targets(tiny, PAIRS, batch_size=4)
    for (prompt, target), s in zip(PAIRS, got):
        lp, am, tgt = naive_scores(tiny, prompt, target)
        assert s.target == tgt
        assert s.argmax == am
        assert max(abs(a - b) for a, b in zip(s.logprobs, lp)) < 1e-4
        assert s.mean_logprob == pytest.approx(sum(lp) / len(lp), abs=1e-4)
        assert s.token_accuracy == sum(a == t for a, t in zip(am, tgt)) / len(tgt)


def test_results_keep_input_order_and_handle_empty(tiny):
    assert score_targets(tiny, []) == []
    got = score_targets(tiny, PAIRS, batch_size=2)
    for (prompt, target), s in zip(PAIRS, got):
        assert s.target == list(prompt_target(tiny.tokenizer, prompt, target).target_ids)
    with pytest.raises(ValueError):
        score_targets(tiny, PAIRS, padding_side="middle")


def test_target_score_properties():
    s = TargetScore(logprobs=[math.log(0.5), math.log(0.125)], argmax=[7, 3], target=[7, 9])
    assert s.mean_logprob == pytest.approx(math.log(0.25))
    assert s.prob == pytest.approx(0.25)
    assert s.token_accuracy == 0.5
    assert s.n_tokens == 2


def test_generate_returns_strings_tiny(tiny):
    prompts = ["The capital of France is", "Hi", "A longer prompt than the others here"]
    out = generate(tiny, prompts, max_new_tokens=4, batch_size=2)
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(t, str) for t in out)
    ids = generate_ids(tiny, prompts, max_new_tokens=[1, 3, 2], batch_size=8)
    assert [len(x) <= n for x, n in zip(ids, [1, 3, 2])] == [True] * 3
    # Cutting a longer greedy run equals running shorter: each prompt's own limit holds.
    longer = generate_ids(tiny, prompts, max_new_tokens=3, batch_size=1)
    assert ids[1] == longer[1]


# --------------------------------------------------------------------------- metric logic


def ts(mean_lp: float, n: int = 1, correct: int | None = None) -> TargetScore:
    correct = n if correct is None else correct
    return TargetScore(logprobs=[mean_lp] * n, argmax=[1] * correct + [0] * (n - correct), target=[1] * n)


def test_probability_comparison_logic_on_handmade_scores():
    req = EditRequest(
        prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
        rephrase=["France's capital is", "The French capital is"],
        locality=[Probe("The capital of Germany is", "Berlin")],
    )
    groups = M.resolve_metrics(M.DEFAULT_METRICS)
    sc = RequestScores(
        rel=ts(-1.0, 2, 1), rel_true=ts(-3.0),
        gen=[ts(-1.0), ts(-4.0)], gen_true=[ts(-2.0), ts(-2.0)],
        loc=[ts(-0.5)], loc_new=[ts(-6.0)], texts=["Rome, Italy.", "Romeo and"],
    )
    v = request_values(req, sc, sc, groups)
    assert v["efficacy"] is True
    assert v["efficacy_magnitude"] == pytest.approx(math.exp(-1) - math.exp(-3))
    assert v["paraphrase_score"] == 0.5
    assert v["paraphrase_magnitude"] == pytest.approx(((math.exp(-1) - math.exp(-2)) + (math.exp(-4) - math.exp(-2))) / 2)
    assert v["neighborhood_score"] == 1.0
    assert v["neighborhood_magnitude"] == pytest.approx(math.exp(-0.5) - math.exp(-6))
    assert v["reliability"] == 0.5
    assert v["locality"] == 1.0
    assert v["generation_exact"] == 0.5  # "Romeo" is not "Rome"
    assert v["generation_contains"] == 1.0
    # Flip which side is likelier: every comparison flips.
    flipped = RequestScores(
        rel=ts(-3.0), rel_true=ts(-1.0), gen=[ts(-3.0), ts(-3.0)], gen_true=[ts(-1.0), ts(-1.0)],
        loc=[ts(-6.0)], loc_new=[ts(-0.5)], texts=["Paris", "Paris"],
    )
    w = request_values(req, flipped, sc, groups)
    assert (w["efficacy"], w["paraphrase_score"], w["neighborhood_score"]) == (False, 0.0, 0.0)
    assert w["efficacy_magnitude"] < 0 and w["neighborhood_magnitude"] < 0
    # Locality: post argmax vs pre argmax, per position.
    post = RequestScores(rel=ts(-1.0), rel_true=ts(-3.0), loc=[TargetScore([-1.0] * 4, [1, 0, 1, 0], [1] * 4)],
                         loc_new=[ts(-6.0)])
    pre = RequestScores(rel=ts(-1.0), rel_true=ts(-3.0), loc=[TargetScore([-1.0] * 4, [1, 1, 1, 1], [1] * 4)],
                        loc_new=[ts(-6.0)])
    assert request_values(req, post, pre, frozenset({"locality"}))["locality"] == 0.5


def test_requests_without_target_true_or_rephrases_are_not_counted():
    with_true = {"efficacy": True, "paraphrase_score": None, "generalization": None, "reliability": 1.0}
    without = {"efficacy": None, "paraphrase_score": None, "generalization": 0.5, "reliability": 0.0}
    s = summarize([{"pre": with_true, "post": with_true}, {"pre": without, "post": without}])
    assert s["metrics"]["efficacy_score"] == 1.0 and s["counts"]["efficacy_score"] == 1
    assert s["metrics"]["paraphrase_score"] is None and s["counts"]["paraphrase_score"] == 0
    assert s["metrics"]["generalization"] == 0.5 and s["counts"]["generalization"] == 1
    assert s["metrics"]["reliability"] == 0.5 and s["counts"]["reliability"] == 2
    assert s["protocols"]["efficacy_score"] == "probability_comparison"
    assert s["protocols"]["reliability"] == "teacher_forced_token_accuracy"


def test_exact_match_definition():
    assert exact_match(" Rome, Italy", "Rome")
    assert exact_match("Rome", " Rome")
    assert not exact_match(" Romeo", "Rome")
    assert not exact_match(" rome", "Rome")
    assert not exact_match(" It is Rome", "Rome")
    assert exact_match(" U.S.A", "U.S.")
    assert M.contains_match(" It is ROME.", "Rome")


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(LmpatchError, match="Unknown metric"):
        M.resolve_metrics(["reliabilty"])
    assert M.resolve_metrics(["efficacy_score", "reliability"]) == {"counterfact", "reliability"}


# --------------------------------------------------------------------------- evaluate


def test_evaluate_pre_post_restores_model_and_batches(tiny, monkeypatch):
    calls = []
    real_score = M.score_targets
    monkeypatch.setattr(M, "score_targets", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    reqs = tiny_requests(3)
    before = ModelState.of(tiny.model)
    report = evaluate(tiny, reqs, patch=head_patch(tiny), batch_size=8)
    assert len(calls) == 2  # one scoring call for the pre pass, one for the post pass
    assert not before.differences(ModelState.of(tiny.model))
    expected = set(M.METRIC_KEYS) - set(M.GROUPS["fluency"])  # fluency is opt-in (it generates 100 tokens)
    assert set(report.pre) == expected == set(report.post)
    for key, metric in report.post.items():
        assert metric.protocol == M.PROTOCOLS[key] and metric.n == 3
        lo = -1.0 if key.endswith("magnitude") else 0.0
        assert lo <= metric.value <= 1.0
    assert report.pre["locality"].value == 1.0
    assert report.post["locality"].value < 1.0  # a large random head delta moves argmaxes
    assert report.method == "dummy"
    d = json.loads(report.to_json())
    assert d["n"] == 3 and d["post"]["locality"]["protocol"] == "pre_post_agreement"
    assert len(d["records"]) == 3 and "post" in d["records"][0]


def test_zero_patch_changes_nothing_and_no_patch_gives_pre_only(tiny):
    reqs = tiny_requests(2)
    zero = head_patch(tiny, scale=0.0)
    report = evaluate(tiny, reqs, patch=zero, metrics=["reliability", "locality", "counterfact"])
    for key in report.pre:
        assert report.post[key].value == pytest.approx(report.pre[key].value, abs=1e-6)
    assert report.post["locality"].value == 1.0
    only_pre = evaluate(tiny, reqs[0], metrics=["reliability"])
    assert only_pre.post == {} and set(only_pre.pre) == {"reliability"}
    rec = evaluate_request(tiny, reqs[0], zero, metrics=["reliability", "generation"])
    json.dumps(rec)
    assert set(rec) == {"case_id", "pre", "post"}
    assert isinstance(rec["post"]["generations"][0], str) and len(rec["post"]["generations"]) == 3


# --------------------------------------------------------------------------- runner


def test_runner_writes_records_and_summary_and_resumes(tiny, tmp_path):
    reqs = tiny_requests(3)
    calls = []

    def edit_fn(model, request):
        calls.append(request.case_id)
        return head_patch(model, scale=1.0)

    summary = run_single(tiny, reqs, edit_fn, tmp_path, progress=False, metrics=["reliability", "locality", "counterfact"])
    assert calls == ["c0", "c1", "c2"]
    recs = read_records(tmp_path / "records.jsonl")
    assert [r["case_id"] for r in recs] == ["c0", "c1", "c2"]
    assert all(r["edit_seconds"] >= 0 and "pre" in r and "post" in r for r in recs)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("method", "model", "n", "metrics", "metrics_pre", "protocols", "edit_seconds"):
        assert key in on_disk
    assert on_disk["method"] == "dummy" and on_disk["model"] == "tiny-llama" and on_disk["n"] == 3
    assert set(on_disk["edit_seconds"]) == {"median", "p90", "total"}
    assert on_disk["metrics_pre"]["locality"] == 1.0
    assert set(on_disk["metrics"]) == set(on_disk["protocols"]) == {"reliability", "locality", *M.GROUPS["counterfact"]}

    # Rerun: nothing to do. Add a request: only that one is edited.
    run_single(tiny, reqs, edit_fn, tmp_path, progress=False, metrics=["reliability", "locality", "counterfact"])
    assert calls == ["c0", "c1", "c2"]
    # Other metrics or another method is another run: its records would mix with these.
    with pytest.raises(LmpatchError, match="holds a different run .metrics"):
        run_single(tiny, reqs, edit_fn, tmp_path, progress=False, metrics=["reliability"])
    with pytest.raises(LmpatchError, match='method: none there, "other" now'):
        run_single(tiny, reqs, edit_fn, tmp_path, progress=False, metrics=["reliability", "locality", "counterfact"],
                   method="other")
    assert calls == ["c0", "c1", "c2"]
    more = reqs + tiny_requests(4)[3:]
    s2 = run_single(tiny, more, edit_fn, tmp_path, progress=False, metrics=["reliability", "locality", "counterfact"])
    assert calls == ["c0", "c1", "c2", "c3"] and s2["n"] == 4
    assert len(read_records(tmp_path / "records.jsonl")) == 4


def test_runner_keeps_finished_records_on_crash_and_resumes_by_index(tiny, tmp_path):
    reqs = tiny_requests(3, case_ids=False)
    calls = []

    def flaky(model, request):
        calls.append(request.prompt)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return head_patch(model, scale=1.0)

    with pytest.raises(RuntimeError, match="boom"):
        run_single(tiny, reqs, flaky, tmp_path, progress=False, metrics=["reliability"])
    recs = read_records(tmp_path / "records.jsonl")
    assert [r["index"] for r in recs] == [0]
    # A torn line (killed mid-write) must not stop the rerun.
    with (tmp_path / "records.jsonl").open("a") as fh:
        fh.write('{"case_id": null, "ind')
    calls.clear()
    summary = run_single(tiny, reqs, lambda m, r: calls.append(r.prompt) or head_patch(m), tmp_path,
                         progress=False, metrics=["reliability"])
    assert calls == [reqs[1].prompt, reqs[2].prompt]
    assert summary["n"] == 3
    assert sorted(r["index"] for r in read_records(tmp_path / "records.jsonl")) == [0, 1, 2]
    # resume=False starts afresh.
    calls.clear()
    run_single(tiny, reqs, lambda m, r: calls.append(1) or head_patch(m), tmp_path, resume=False,
               progress=False, metrics=["reliability"])
    assert len(calls) == 3 and len(read_records(tmp_path / "records.jsonl")) == 3


def test_runner_detects_a_model_that_was_not_restored(tiny, tmp_path):
    w = tiny.model.get_output_embeddings().weight
    saved = w.detach().clone()
    leaky = DeltaPatch("lm_head.weight", 0.5 * torch.randn(w.shape), exact=False)
    try:
        with pytest.raises(PatchError, match="not restored"):
            run_single(tiny, tiny_requests(2), lambda m, r: leaky, tmp_path, progress=False, metrics=["reliability"])
    finally:
        with torch.no_grad():
            w.copy_(saved)
    with pytest.raises(LmpatchError, match="not a patch"):
        run_single(tiny, tiny_requests(1), lambda m, r: None, tmp_path / "x", progress=False, metrics=["reliability"])


def test_runner_and_evaluate_with_the_real_patch_class(tiny, tmp_path):
    from lmpatch.patch import Patch, WeightDelta

    name = tiny.spec.layers[1].mlp_out + ".weight"
    rows, cols = tiny.model.get_parameter(name).shape
    before = ModelState.of(tiny.model)

    def edit_fn(model, request):
        g = torch.Generator().manual_seed(len(request.prompt))
        delta = WeightDelta(name, left=3 * torch.randn(rows, 1, generator=g), right=torch.randn(1, cols, generator=g))
        return Patch(parts=[delta], method="rank1", model_fingerprint=model.fingerprint, model_name=model.name)

    summary = run_single(tiny, tiny_requests(2), edit_fn, tmp_path, progress=False, metrics=["reliability", "locality"])
    assert summary["method"] == "rank1" and summary["n"] == 2
    assert not before.differences(ModelState.of(tiny.model)) and tiny.applied == []
    report = evaluate(tiny, tiny_requests(1), patch=edit_fn(tiny, tiny_requests(1)[0]), metrics=["locality"])
    assert report.method == "rank1" and report.post["locality"].value < 1.0
    assert not before.differences(ModelState.of(tiny.model))
    # A saved patch's path is read as the patch; anything else is refused by name.
    edit_fn(tiny, tiny_requests(1)[0]).save(tmp_path / "p.lmpatch")
    from_file = evaluate(tiny, tiny_requests(1), patch=str(tmp_path / "p.lmpatch"), metrics=["locality"])
    assert from_file.method == "rank1" and from_file.post["locality"].value == report.post["locality"].value
    with pytest.raises(LmpatchError, match="patch= takes a Patch or the path of a .lmpatch file, got int"):
        evaluate(tiny, tiny_requests(1), patch=5)


# --------------------------------------------------------------------------- real model


@pytest.mark.model
def test_batch_size_and_padding_side_invariance_real(real):
    ref = score_targets(real, PAIRS, batch_size=1)
    for bs, side in [(8, "right"), (8, "left"), (3, "left")]:
        assert_same_scores(ref, score_targets(real, PAIRS, batch_size=bs, padding_side=side))


@pytest.mark.model
def test_scores_match_naive_full_forward_real(real):
    got = score_targets(real, PAIRS[-3:], batch_size=3)
    for (prompt, target), s in zip(PAIRS[-3:], got):
        lp, am, tgt = naive_scores(real, prompt, target)
        assert s.target == tgt and s.argmax == am
        assert max(abs(a - b) for a, b in zip(s.logprobs, lp)) < 1e-4


@pytest.mark.model
def test_targets_are_id_concatenations_not_retokenised_strings(real):
    tok = real.tokenizer
    prompt, target = "The capital of France is ", "Paris"  # trailing space: the seam tokenises differently
    (s,) = score_targets(real, [(prompt, target)])
    pt = prompt_target(tok, prompt, target)
    assert s.target == list(pt.target_ids)
    glued = encode(tok, prompt + target)
    assert list(pt.prompt_ids) + list(pt.target_ids) != glued  # so the check below means something
    lp, _, _ = naive_scores(real, prompt, target)
    assert max(abs(a - b) for a, b in zip(s.logprobs, lp)) < 1e-4
    # Chat wrapping: the target follows the wrapped prompt, as IDs.
    chat = lmpatch.wrap_model(real.model, tok, name=real.name, chat=True)
    (c,) = score_targets(chat, [("The capital of France is", "Paris")])
    (pc,) = encode_pairs(chat, [("The capital of France is", "Paris")])
    assert c.target == list(pc.target_ids)
    assert "<|im_start|>" in chat.format_prompt("x")


@pytest.mark.model
def test_unedited_efficacy_and_neighborhood_on_known_fact(real):
    req = EditRequest(
        prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
        rephrase=["France's capital city is", "The French capital is"],
        locality=[Probe("The capital of Germany is", "Berlin"), Probe("The capital of Japan is", "Tokyo")],
    )
    report = evaluate(real, [req], metrics=["counterfact", "reliability", "generation"])
    assert report.pre["efficacy_score"].value == 0.0 and report.pre["efficacy_score"].n == 1
    assert report.pre["efficacy_magnitude"].value < 0
    assert report.pre["neighborhood_score"].value == 1.0
    assert report.pre["neighborhood_magnitude"].value > 0
    assert report.pre["reliability"].value == 0.0
    assert report.pre["generation_contains"].protocol == "generation_contains"
    flipped = EditRequest(prompt=req.prompt, subject="France", target_new="Paris", target_true="Rome")
    assert evaluate(real, flipped, metrics=["counterfact"]).pre["efficacy_score"].value == 1.0


@pytest.mark.model
def test_batched_generation_equals_one_at_a_time_real(real):
    prompts = [p for p, _ in PAIRS[:5]]
    batched = generate(real, prompts, max_new_tokens=6, batch_size=5)
    assert all(isinstance(t, str) for t in batched)
    assert batched == [real.generate_text(p, 6) for p in prompts]
    assert "Paris" in generate(real, ["The capital of France is"], max_new_tokens=3)[0]


def test_probe_kinds_are_reported_separately(tiny):
    """Each portability kind and side effect is averaged over its own probes only, and
    plain locality ignores the typed locality probes."""
    req = tiny_requests(1)[0]
    report = evaluate(tiny, [req], patch=head_patch(tiny), metrics=["locality", "portability", "side_effects"])
    rec = report.records[0]["post"]
    plain = evaluate(tiny, [EditRequest(
        prompt=req.prompt, subject=req.subject, target_new=req.target_new,
        locality=[req.locality[0]], portability=[req.portability[3]],
    )], patch=head_patch(tiny), metrics=["locality", "portability"]).records[0]["post"]
    assert rec["locality"] == plain["locality"]
    assert rec["portability_one_hop"] == plain["portability"]
    assert set(report.post) >= {"other_attribution", "distracting_neighbourhood", "portability_subject_alias"}
    assert report.post["other_attribution"].protocol == M.PRE_POST
    assert report.pre["distracting_neighbourhood"].value == 1.0


@pytest.mark.model
def test_metrics_do_not_depend_on_batch_size_real(real):
    """Whole metric tables, not only raw scores: batch size 1 and 8 give the same numbers
    on real CounterFact records (their prompts differ in length, so padding is exercised)."""
    from lmpatch.data import load_dataset

    reqs = load_dataset("counterfact", n=3)
    groups = ["reliability", "generalization", "portability", "side_effects", "counterfact"]
    one = evaluate(real, reqs, metrics=groups, batch_size=1)
    eight = evaluate(real, reqs, metrics=groups, batch_size=8)
    assert set(one.pre) == set(eight.pre) and len(one.pre) >= 8
    for key, m in one.pre.items():
        assert eight.pre[key].value == pytest.approx(m.value, abs=1e-6), key


def test_a_models_remembered_pair_ids_are_the_computed_ones_and_its_own():
    """The memo of token IDs is per model (each tokenizer its own) and returns what
    tokenising afresh gives."""
    from lmpatch.model.forced import compute_pair_ids, pair_ids
    from tiny import tiny_model

    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    for model in (llama, gpt2):
        first = pair_ids(model, "The capital of France is", " Paris")
        assert first == compute_pair_ids(model, "The capital of France is", " Paris")
        assert pair_ids(model, "The capital of France is", " Paris") is first  # remembered
        assert pair_ids(model, "The capital of France is", " Rome") == compute_pair_ids(
            model, "The capital of France is", " Rome")
    assert llama.pair_ids is not gpt2.pair_ids
