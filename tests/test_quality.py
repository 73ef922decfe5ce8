"""End-to-end editing quality on the real SmolLM2 and real held-out CounterFact records.

These are the slow runs (``make test-all``); ``make test`` keeps one real-model ROME
edit (tests/test_rome.py). Thresholds sit below the measured numbers reported in the
README so that a real regression fails while run-to-run noise on 10 records does not.
"""
from __future__ import annotations

import pytest

import lmpatch
from lmpatch.data import case_ids, drop_cases, load_dataset
from lmpatch.eval.metrics import evaluate_request, summarize

pytestmark = [pytest.mark.model, pytest.mark.slow]
METRICS = ("reliability", "generalization", "locality", "counterfact")


@pytest.fixture(scope="module")
def held_out():
    records = drop_cases(load_dataset("counterfact"), case_ids(load_dataset("counterfact-train")))
    return records[:10]


def _run(model, requests, method):
    records = [evaluate_request(model, r, lmpatch.edit(model, r, method), metrics=METRICS) for r in requests]
    return summarize(records)


# r-ROME's update maps the template-averaged key (not the bare prompt's) to its target,
# so the bare prompt only gets delta * (k_p.u)/(k_mean.u); with ROME's tuned (small) clamp
# that is often too weak. Measured on these 10 records in two processes: efficacy 0.7 and
# >= 0.9, paraphrase 0.65. A known gap (r-ROME needs its own tuning), kept visible here.
# ROME with the defaults of docs/rome-generalisation.md measured efficacy 1.0, paraphrase
# 1.0, reliability 1.0 and neighbourhood 0.70 (unedited 0.77) on these 10 records, and
# paraphrase 0.92 on 100 counterfact-edit records, hence the paraphrase bound of 0.85.
@pytest.mark.parametrize(
    ("method", "min_efficacy", "min_paraphrase", "min_reliability"),
    [("rome", 0.9, 0.85, 0.9), ("r-rome", 0.6, 0.5, 0.5)],
)
def test_rome_quality(real_model, held_out, method, min_efficacy, min_paraphrase, min_reliability):
    s = _run(real_model, held_out, method)
    post, pre = s["metrics"], s["metrics_pre"]
    assert pre["efficacy_score"] < 0.5  # the edits really change something
    assert post["efficacy_score"] >= min_efficacy
    assert post["paraphrase_score"] >= min_paraphrase
    assert post["reliability"] >= min_reliability
    assert post["neighborhood_score"] >= pre["neighborhood_score"] - 0.1


def test_ft_m_quality(real_model, held_out):
    s = _run(real_model, held_out[:5], "ft-m")
    assert s["metrics"]["reliability"] >= 0.8
    assert s["metrics"]["efficacy_score"] >= 0.8


# ----------------------------------------------------------------------------- lifelong editors
# Sequential: each edit applied on top of the earlier ones, all ten re-scored after the last,
# as in docs/lifelong.md. Bounds sit below what these ten records measured (numbers beside
# each entry) and at the goals where those are the binding ones.
LIFELONG = [
    # method, min reliability, min locality, min generalization
    ("grace", 0.9, 0.95, 0.0),
    ("t-patcher", 0.9, 0.8, 0.0),
    ("wise", 0.9, 0.95, 0.0),  # measured 0.97 / 0.985 (generalization 0.33)
    # memory-based editors. SERAC's goals (reliability and locality >= 0.95, generalization
    # >= 0.6 at T = 100) are measured on 100 counterfact-edit records (README): 0.93 / 0.995
    # / 0.87. On these ten it measured 0.90 / - / 0.55 (20 paraphrases, one edit the model
    # will not repeat after reading it), so only locality is held at its goal here
    ("serac", 0.85, 0.95, 0.45),
    ("memprompt", 0.9, 0.85, 0.0),  # locality measured 0.92 here, 0.94 on 100 counterfact-edit records
]


@pytest.mark.parametrize(("method", "min_reliability", "min_locality", "min_generalization"), LIFELONG)
def test_lifelong_editor_quality(real_model, held_out, tmp_path, method, min_reliability, min_locality,
                                 min_generalization):
    from lmpatch.eval.sequential import run_sequential

    summary = run_sequential(
        real_model, held_out, lambda m, r: lmpatch.edit(m, r, method), tmp_path, progress=False,
        metrics=("reliability", "generalization", "locality"), checkpoints=[len(held_out)], method=method,
    )
    post, pre = summary["metrics"], summary["metrics_pre"]
    assert pre["reliability"] < 0.5  # the edits really change something
    assert post["reliability"] >= min_reliability
    assert post["locality"] >= min_locality
    assert post["generalization"] >= min_generalization
    assert not real_model.applied  # the run took every patch out again


def test_ike_quality(real_model, held_out):
    """IKE edits in context only: the edited prompt must prefer the new target (the issue's
    goal is efficacy >= 0.9 on 100 counterfact-edit records), with the weights untouched."""
    state = {k: v.clone() for k, v in real_model.model.state_dict().items()}
    s = _run(real_model, held_out[:5], "ike")
    assert s["metrics_pre"]["efficacy_score"] < 0.5
    assert s["metrics"]["efficacy_score"] >= 0.8
    assert all(v.equal(state[k]) for k, v in real_model.model.state_dict().items())


# ----------------------------------------------------------------------------- learned editors
# The shipped MEND editor, no training step. On 100 counterfact-edit records it measured
# efficacy 0.95, paraphrase 0.90, neighbourhood 0.48 (unedited 0.66) and on 100 zsRE
# records reliability 0.93, locality 0.968 (docs/learned-editors.md). The issue's
# neighbourhood goal (unedited - 0.05) is NOT met; the bound below only guards against the
# edit spreading further than measured. zsRE's first 10 records measured reliability 0.80.
# These 10 ROME-schema records are harder than counterfact-edit's: paraphrase 0.70 here,
# exactly the bound (0.63 on the first 30; 2026-12-07), against 0.90 on counterfact-edit.


def test_shipped_mend_quality(real_model, held_out):
    s = _run(real_model, held_out, "mend")
    post, pre = s["metrics"], s["metrics_pre"]
    assert pre["efficacy_score"] < 0.5
    assert post["efficacy_score"] >= 0.9 and post["paraphrase_score"] >= 0.7
    assert post["neighborhood_score"] >= pre["neighborhood_score"] - 0.4
    zsre = load_dataset("zsre", n=10)
    z = summarize([evaluate_request(real_model, r, lmpatch.edit(real_model, r, "mend"),
                                    metrics=("reliability", "locality")) for r in zsre])
    assert z["metrics"]["reliability"] >= 0.75 and z["metrics"]["locality"] >= 0.9


# UltraEdit with its defaults, 5 sequential batches of 100 held-out edits. Measured with
# the defaults since 2026-12-06 (lr 2e-4, retry_lr 4e-4, margin 0.5, refresh 2; bfloat16
# passes on a Xeon with AMX): efficacy 1.00 on these 100 scored edits, perplexity
# 23.33 -> 23.64 (+1%); the former defaults (lr 3e-4, no margin or refresh) 0.97 and +2%.
# The scale run (docs/ultraedit.md) keeps 0.926 at +18% by 10,000 edits. On an AVX2-only
# CPU the passes run in float32; 0.95 leaves room for five records to flip between kernels.
def test_ultraedit_sequential_quality(real_model):
    from lmpatch.eval.perplexity import perplexity

    requests = load_dataset("counterfact-edit", n=500)
    sample = requests[::5]
    unedited = summarize([evaluate_request(real_model, r, None, metrics=("counterfact",)) for r in sample])
    before = perplexity(real_model, max_tokens=4096, progress=False).value
    patches = []
    try:
        for start in range(0, len(requests), 100):
            patch = lmpatch.edit(real_model, requests[start : start + 100], "ultraedit")
            patch.apply(real_model)
            patches.append(patch)
        scored = summarize([evaluate_request(real_model, r, None, metrics=("counterfact",))
                            for r in sample])["metrics_pre"]
        after = perplexity(real_model, max_tokens=4096, progress=False).value
    finally:
        for patch in reversed(patches):
            patch.revert(real_model)
    assert len(patches) == 5 and patches[-1].metrics["edit"]["preserved_keys"] > 0
    assert unedited["metrics_pre"]["efficacy_score"] < 0.5  # the edits really change something
    assert scored["efficacy_score"] >= 0.95, scored
    assert after <= 1.06 * before, (before, after)
    assert perplexity(real_model, max_tokens=4096, progress=False).value == before  # reverted exactly


# The forget job on a model that really leaks: SmolLM2 fine-tuned on 30 synthetic people's
# phone numbers (Faker seed 3, no benchmark or tuning uses it; ~40 s on a Xeon with AMX),
# then ft-generic with its defaults forgets the first 10 and is told to keep the next 10.
# Measured with the defaults (one torch thread, another job on the cores; 333 s in all):
# extraction 0.8 -> 0.0, the 10 to keep 0.9 -> 0.9, exposure of two secrets among 500
# 8.97 -> 1.05 bits (chance 1.43; the version without the secret's own target left 6.5-7),
# perplexity +0.5%. Alone with torch held to AVX2 (float32, cold cache, the leaky model
# built too) the test took 236 s. The 10 people it was neither asked to forget nor told to keep fall
# 0.8 -> 0.3: the known cost (docs/applications.md), not checked here.
def test_ft_generic_forgets_a_leaky_models_people(real_model):
    from lmpatch.eval.perplexity import perplexity
    from lmpatch.eval.privacy import chance_exposure, mean_exposure
    from lmpatch.jobs.memorise import MemoriseConfig, memorised_model
    from lmpatch.jobs.secrets import synthetic_secrets

    people = synthetic_secrets(30, seed=3)
    leaky = memorised_model(real_model, people, MemoriseConfig(seed=3), show=False)
    forget, keep = people[:10], people[10:20]
    exposed = forget[:2]
    before = {"exposure": mean_exposure(leaky, exposed, 499),
              "perplexity": perplexity(leaky, max_tokens=2048, progress=False).value}
    patch = lmpatch.forget(leaky, forget, method="ft-generic", keep=keep)
    report = patch.metrics["forget"]
    with patch.applied(leaky):
        after = {"exposure": mean_exposure(leaky, exposed, 499),
                 "perplexity": perplexity(leaky, max_tokens=2048, progress=False).value}
    assert report["extraction_before"] >= 0.7 and before["exposure"] >= 8.5, (report, before)  # it leaks
    assert report["extraction_after"] <= 0.05, report
    assert report["kept_after"] >= report["kept_before"] - 0.1, report
    assert after["exposure"] <= chance_exposure(500) + 1.5, after
    assert after["perplexity"] <= 1.05 * before["perplexity"], (before, after)
