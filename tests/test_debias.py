"""Debiasing: DAMA's data and bias score, causal tracing, DAMA, LSDM, the job and the CLI.

The methods are checked for their mechanics on tiny random models; whether SmolLM2's
WinoBias gap closes is ``benchmarks/debias.py``'s business (numbers in
docs/applications.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lmpatch
from lmpatch.eval.gender_bias import load_bias_prompts, profession_of, professions, regress
from lmpatch.jobs.debias import debias_requests, training_prompts
from lmpatch.methods.locate.causal_trace import Trace, TraceConfig, pronoun_gap, trace_mlp_effects
from lmpatch.methods.locate.templates import TemplateConfig, context_templates
from lmpatch.methods.locate.values import ValueConfig, optimize_values
from lmpatch.model.spec import from_param_layout
from lmpatch.request import EditRequest
from tiny import tiny_model

PROMPTS = [("The surgeon laughed because", "The surgeon"), ("The nurse said that", "The nurse"),
           ("The plastic surgeon wished that", "The plastic surgeon"), ("The baker cried because", "The baker")]
REQUESTS = [EditRequest(prompt=p, subject=s, target_new="they") for p, s in PROMPTS]


# ----------------------------------------------------------------------------- data and score


def test_shipped_prompts_split_professions_apart():
    train, test = load_bias_prompts("train"), load_bias_prompts("test")
    assert (len(train), len(test)) == (2409, 1111) and len(professions()) == 320
    assert not {p.profession.name for p in train} & {p.profession.name for p in test}
    assert all(p.prompt.startswith(p.subject) and p.subject.endswith(p.profession.name) for p in train + test)
    with pytest.raises(lmpatch.LmpatchError, match="Unknown DAMA split"):
        load_bias_prompts("dev")


def test_profession_is_the_longest_name_after_the_article():
    assert profession_of("The plastic surgeon wished that").name == "plastic surgeon"
    assert profession_of("The surgeon wished that").name == "surgeon"
    with pytest.raises(lmpatch.LmpatchError, match="No DAMA profession"):
        profession_of("The zyzzyva ate because")


def test_regression_recovers_known_slopes():
    rng = np.random.default_rng(0)
    s, f = rng.normal(size=200), rng.normal(size=200)
    out = regress(s, f, 0.3 * s - 0.2 * f + 0.05)
    assert out["slope_s"] == pytest.approx(0.3) and out["slope_f"] == pytest.approx(-0.2)
    assert out["intercept"] == pytest.approx(0.05) and out["r2"] == pytest.approx(1.0)


def test_bias_score_runs_through_the_patch_stack():
    from lmpatch.eval.gender_bias import bias_scores

    model = tiny_model("llama")
    before = bias_scores(model, "test", limit=40)
    assert before["n"] == 40 and 0 <= before["prob_he"] <= 1
    patch = lmpatch.edit(model, REQUESTS, "dama", layers=(2,), nullspace_dimension=2, mom2_adjustment=False,
                         v_steps=3, template_lengths=((3, 1),))
    with patch.applied(model):
        after = bias_scores(model, "test", limit=40)
    assert after["prob_he"] != before["prob_he"]


# ----------------------------------------------------------------------------- causal tracing


def test_trace_is_reproducible_and_zero_without_noise():
    model = tiny_model("llama")
    signal = pronoun_gap(model)
    a = trace_mlp_effects(model, PROMPTS, signal, TraceConfig(samples=2, seed=1))
    b = trace_mlp_effects(model, PROMPTS, signal, TraceConfig(samples=2, seed=1))
    assert a.effects == b.effects and len(a.effects) == len(model.spec.layers)
    assert any(e != 0 for e in a.effects)
    quiet = trace_mlp_effects(model, PROMPTS, signal, TraceConfig(noise_scale=0.0, samples=1))
    assert quiet.effects == [0.0] * len(model.spec.layers) and quiet.clean == pytest.approx(quiet.corrupted)


def test_restoring_every_mlp_is_read_against_the_same_corrupted_run():
    """Replaying the lower blocks must give what running them gives: restoring layer 0
    (nothing replayed) and the replayed layers agree with a trace of fresh passes."""
    from lmpatch.methods.locate import causal_trace

    model = tiny_model("llama")
    signal = pronoun_gap(model)
    fast = trace_mlp_effects(model, PROMPTS, signal, TraceConfig(samples=1))
    real_replay = causal_trace.replay_outputs
    try:
        causal_trace.replay_outputs = lambda modules, outputs: torch.no_grad()  # run every block
        slow = trace_mlp_effects(model, PROMPTS, signal, TraceConfig(samples=1))
    finally:
        causal_trace.replay_outputs = real_replay
    assert fast.effects == pytest.approx(slow.effects, abs=1e-5)


def test_best_window_sums_consecutive_effects():
    trace = Trace(effects=[0.1, 0.5, 0.4, 0.0, 0.9, 0.0], clean=0, corrupted=0, n_prompts=1)
    assert trace.best_window(2) == [1, 2]
    assert trace.best_window(1) == [4] and trace.best_window(1, 0, 3) == [1]
    with pytest.raises(lmpatch.LmpatchError, match="consecutive"):
        trace.best_window(5, 0, 2)


# ----------------------------------------------------------------------------- the two methods


def test_alternatives_make_the_loss_the_mean_nll_of_both_words():
    """LSDM's target: with alternatives ("he", "she") each template gets one row per word
    and the value loss is the mean NLL over templates and words, which two words
    competing for one position minimise at equal probability."""
    from lmpatch.eval.scoring import score_targets
    from lmpatch.methods.locate.values import build_group_rows

    model = tiny_model("llama")
    templates = context_templates(model, TemplateConfig(lengths=((3, 1),)))
    prompt = "The surgeon laughed because"
    request = EditRequest(prompt=prompt, subject=prompt, target_new="he")  # edited at the last token
    rows = build_group_rows(model, [request], templates, ("{} is a",), alternatives=[("he", "she")])
    assert rows.rewrite_rows.shape == (1, len(templates)) and len(rows.tgt_tok) == 2 * len(templates)
    assert float(rows.tgt_weight.sum()) == pytest.approx(1.0)
    config = ValueConfig(steps=1, weight_decay=0.0, kl_factor=0.0, stop_loss=0.0, target="block", compute_dtype="float32")
    [value] = optimize_values(model, [request], 2, templates, config, alternatives=[("he", "she")])
    texts = [t.format(prompt) for t in templates]
    scores = score_targets(model, [(t, " " + w) for t in texts for w in ("he", "she")])
    expected = -sum(sum(s.logprobs) for s in scores) / len(scores)
    assert value.losses[0] == pytest.approx(expected, abs=1e-4)


def test_dama_removes_its_directions_from_the_layer_output():
    model = tiny_model("llama")
    patch = lmpatch.edit(model, REQUESTS * 3, "dama", layers=(1, 2), nullspace_dimension=3, mom2_adjustment=False,
                         v_steps=3, template_lengths=((3, 1),))
    entries = patch.metrics["edit"]["layers"]
    assert [entry["layer"] for entry in entries] == [1, 2]
    by_param = {part.param: part for part in patch.parts}
    for entry in entries:
        module = model.spec.mlp_out(model.model, entry["layer"])
        part = by_param[model.spec.layers[entry["layer"]].mlp_out + ".weight"]
        w0 = from_param_layout(module, module.weight.detach()).double()
        delta = from_param_layout(module, part.materialize(torch.float64))
        r = entry["directions"]
        assert 1 <= r <= 3 and torch.linalg.matrix_rank(delta) == r
        q = torch.linalg.svd(delta)[0][:, :r]       # the removed output directions
        after = w0 + delta
        assert (q.T @ after).abs().max() < 1e-5 * w0.abs().max()   # nothing written along them any more
        assert torch.allclose(after @ after.T @ q, torch.zeros_like(q), atol=1e-4)


def test_dama_mixed_update_reads_the_same_keys_as_the_value_optimisation():
    from lmpatch.methods.dama import last_token_keys, last_token_requests

    model = tiny_model("llama")
    templates = context_templates(model, TemplateConfig(lengths=((3, 2),)))
    keys = last_token_keys(model, REQUESTS[:2], 2, templates)
    values = optimize_values(model, last_token_requests(REQUESTS[:2], ("he",)), 2, templates,
                             ValueConfig(steps=1, compute_dtype="float32"))
    assert torch.allclose(keys.float(), torch.stack([v.key_mean for v in values]).float(), atol=1e-4)
    patch = lmpatch.edit(model, REQUESTS * 2, "dama", update="mixed", layers=(1, 2), nullspace_dimension=2,
                         mom2_adjustment=False, v_steps=2, template_lengths=((3, 1),))
    assert [e["directions"] for e in patch.metrics["edit"]["layers"]] == [2, 2]


def test_lsdm_locates_lower_layers_and_reports_its_trace():
    model = tiny_model("llama")
    patch = lmpatch.edit(model, REQUESTS, "lsdm", n_layers=2, trace_samples=1, mom2_adjustment=False,
                         mom2_update_weight=1.0, v_steps=3, template_lengths=((3, 1),))
    info = patch.metrics["edit"]
    n = len(model.spec.layers)
    assert len(info["located"]) == 2 and max(info["located"]) < max(2, n // 2 + 1)
    assert len(info["trace"]["effects"]) == n
    given = lmpatch.edit(model, REQUESTS, "lsdm", layers=(1,), mom2_adjustment=False, mom2_update_weight=1.0,
                         v_steps=2, template_lengths=((3, 1),))
    assert given.metrics["edit"]["located"] == [1] and "trace" not in given.metrics["edit"]


@pytest.mark.parametrize("method, bad, expected", [
    ("dama", dict(contrast=("he",)), "two words"),
    ("dama", dict(nullspace_dimension=0), "nullspace_dimension"),
    ("dama", dict(update="once"), "Unknown update"),
    ("lsdm", dict(n_layers=0), "n_layers"),
])
def test_method_mistakes_are_one_clear_error(method, bad, expected):
    model = tiny_model("llama")
    with pytest.raises(lmpatch.LmpatchError, match=expected):
        lmpatch.edit(model, REQUESTS, method, mom2_adjustment=False, v_steps=1, template_lengths=((3, 1),), **bad)


# ----------------------------------------------------------------------------- the job and the CLI


def test_debias_job_returns_a_patch_and_leaves_the_model():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    patch = lmpatch.debias(model, [{"prompt": p, "subject": s} for p, s in PROMPTS], method="lsdm",
                           measure=None, layers=(1,), mom2_adjustment=False, mom2_update_weight=1.0, v_steps=2,
                           template_lengths=((3, 1),))
    assert patch.metrics["debias"]["n_prompts"] == 4 and patch.method == "lsdm"
    assert all(torch.equal(v, state[k]) for k, v in model.model.state_dict().items())
    with pytest.raises(lmpatch.LmpatchError, match="Unknown debias method"):
        lmpatch.debias(model, REQUESTS, method="rome")
    with pytest.raises(lmpatch.LmpatchError, match="WinoBias split"):
        lmpatch.debias(model, REQUESTS, measure="train")
    with pytest.raises(lmpatch.LmpatchError, match="'prompt' and 'subject'"):
        debias_requests([{"prompt": "The nurse said that"}])
    assert len(training_prompts(10, seed=3)) == 10 and training_prompts(10, 3) == training_prompts(10, 3)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.model
def test_lsdm_halves_smollm2s_winobias_gap(real_model):
    """LSDM on 64 of DAMA's training prompts (the layers its trace finds on SmolLM2, 0-2,
    given so the trace's minute is not spent here) narrows the pro - anti gap on WinoBias
    *test*, keeps coreference accuracy and costs at most 5% perplexity.

    Measured (docs/applications.md, AMD EPYC without AMX): gap 0.071 -> 0.034, 56 of 792
    sentences -> 27, the issue's "halved". The guard here is 0.6 of before: the targets
    are a tie with many optima (float32 by default for that reason, LSDMHparams), and
    single sentences decide the last step."""
    from lmpatch.eval.perplexity import perplexity
    from lmpatch.eval.winobias import winobias_scores

    before = winobias_scores(real_model, "test")
    ppl_before = perplexity(real_model, max_tokens=4096, progress=False).value
    patch = lmpatch.debias(real_model, method="lsdm", n_prompts=64, measure=None, layers=(0, 1, 2))
    with patch.applied(real_model):
        after = winobias_scores(real_model, "test")
        ppl_after = perplexity(real_model, max_tokens=4096, progress=False).value
    assert before["gap"] > 0.05                      # there is a bias to remove
    assert after["gap"] <= 0.6 * before["gap"]
    assert after["accuracy"] >= before["accuracy"] - 0.03
    assert ppl_after <= ppl_before * 1.05
