"""Editing metrics, each tagged with the protocol that produced it.

Published numbers for model editing come from incompatible protocols:
EasyEdit/zsRE report *teacher-forced token accuracy*, the ROME/MEMIT papers report
*probability comparisons* on CounterFact, and generation-based checks give much lower
numbers again. A bare "reliability 0.98" is therefore meaningless; every value here
carries its protocol and the number of requests it averages over, and pre-edit values
are always reported next to post-edit ones.

Per request and per pass (pre = unedited model, post = patch applied):

* ``reliability`` - token accuracy of ``target_new`` after ``prompt``.
* ``generalization`` - token accuracy of ``target_new`` after each rephrase, averaged
  over the request's rephrases (requests without rephrases are left out).
* ``locality`` - for each locality probe, the fraction of its answer positions where the
  post-edit argmax equals the pre-edit argmax (teacher-forced on the probe's answer,
  EasyEdit's definition); averaged over the request's probes. Pre is 1.0 by definition.
* ``portability`` - token accuracy of each portability probe's answer, averaged; and per
  kind of probe (the survey's three): ``portability_subject_alias`` (the edit asked
  through another name of the subject), ``portability_reversed_relation`` (the inverse
  question, answered by the subject) and ``portability_one_hop`` (a fact that follows
  from the new one).
* ``other_attribution`` / ``distracting_neighbourhood`` - side effects, measured like
  ``locality`` (pre/post argmax agreement on the probe's answer) on the locality probes
  of that kind: other facts about the *edited* subject, and neighbourhood prompts with
  the edited fact written in front of them. ``locality`` and the neighbourhood score use
  only plain neighbourhood probes, so the three are never mixed.
* ``efficacy`` (bool) / ``efficacy_magnitude`` - mean log P(target_new | prompt) >
  mean log P(target_true | prompt), and exp(mean logP new) - exp(mean logP true), with
  the length-normalised log-likelihood of :class:`TargetScore` (ROME's protocol).
* ``paraphrase_score`` / ``paraphrase_magnitude`` - the same over the rephrases: the
  fraction of rephrases where new beats true, and the mean probability difference.
* ``neighborhood_score`` / ``neighborhood_magnitude`` - over locality probes, the
  fraction where the probe's own answer beats ``target_new`` and the mean of
  exp(answer) - exp(new). For CounterFact the probe answers are the original object.
  Efficacy and paraphrase need ``target_true``; neighbourhood needs only probes.
* ``generation_exact`` / ``generation_contains`` - greedy continuations of the prompt and
  each rephrase, ``len(target tokens) + 5`` new tokens. *Exact*: the continuation, with
  surrounding whitespace stripped, starts with the stripped target (case-sensitive) and,
  when the target ends in a letter or digit, the next character is not one (so "Rome"
  does not match "Romeo"). *Contains*: the stripped target occurs anywhere in the
  continuation, case-insensitively. Both are the fraction over prompt + rephrases.
* ``reliability_wild`` / ``generalization_wild`` / ``locality_wild`` - the generation
  protocol of QAEdit (Yang et al. 2025, "The Mirage of Model Editing: Revisiting
  Evaluation in the Wild"), see :mod:`lmpatch.eval.wild`: the prompt alone, greedy, at
  most 50 new tokens, the answer cut before the first "." or newline and SQuAD-normalised.
  Reliability: the edit prompt's answer equals ``target_new``; generalization: the
  fraction of rephrases whose answer does; locality: the fraction of plain neighbourhood
  probes whose post-edit answer equals the unedited model's (the pre-edit answers come
  from the pre pass, generated once; pre is 1.0 by definition). Teacher-forced accuracy
  hands the model the target's tokens and length; these ask it to produce them, so they
  are lower, and closer to how an edit is used. Each pass keeps its raw continuations
  in ``wild_generations``.

* ``fluency`` - ROME's n-gram entropy (bits; papers print it x100) of greedy
  100-token continuations of the request's first :data:`FLUENCY_PROMPTS` generation
  prompts (CounterFact's ``generation_prompts``; the edit prompt when there are none).
  Lower after an edit than before means the model has started repeating itself.

Scores, accuracies and fractions lie in [0, 1] (fluency is in bits); magnitudes are probability differences
in [-1, 1]. Averages over requests are unweighted means of the per-request values.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from lmpatch.errors import InvalidRequestError, LmpatchError
from lmpatch.eval import wild
from lmpatch.eval.scoring import TargetScore, encode_pairs, generate, score_targets
from lmpatch.eval.wild import WildGenerations
from lmpatch.model.loading import LoadedModel
from lmpatch.request import EditRequest, Probe, as_requests

TEACHER_FORCED = "teacher_forced_token_accuracy"
PROBABILITY = "probability_comparison"
GENERATION_EXACT = "generation_exact_match"
GENERATION_CONTAINS = "generation_contains"
GENERATION_WILD = "generation_wild_exact_match"
PRE_POST = "pre_post_agreement"
NGRAM_ENTROPY = "ngram_entropy_of_greedy_generation"

FLUENCY_PROMPTS = 2        # generation prompts per request scored for fluency
FLUENCY_TOKENS = 100       # ROME's generation length

PROTOCOLS: dict[str, str] = {
    "reliability": TEACHER_FORCED,
    "generalization": TEACHER_FORCED,
    "locality": PRE_POST,
    "portability": TEACHER_FORCED,
    "portability_subject_alias": TEACHER_FORCED,
    "portability_reversed_relation": TEACHER_FORCED,
    "portability_one_hop": TEACHER_FORCED,
    "other_attribution": PRE_POST,
    "distracting_neighbourhood": PRE_POST,
    "efficacy_score": PROBABILITY,
    "paraphrase_score": PROBABILITY,
    "neighborhood_score": PROBABILITY,
    "efficacy_magnitude": PROBABILITY,
    "paraphrase_magnitude": PROBABILITY,
    "neighborhood_magnitude": PROBABILITY,
    "generation_exact": GENERATION_EXACT,
    "generation_contains": GENERATION_CONTAINS,
    "reliability_wild": GENERATION_WILD,
    "generalization_wild": GENERATION_WILD,
    "locality_wild": GENERATION_WILD,
    "fluency": NGRAM_ENTROPY,
}
METRIC_KEYS: tuple[str, ...] = tuple(PROTOCOLS)

# Metric groups a caller selects; each group costs one kind of model work.
GROUPS: dict[str, tuple[str, ...]] = {
    "reliability": ("reliability",),
    "generalization": ("generalization",),
    "locality": ("locality",),
    "portability": ("portability", "portability_subject_alias", "portability_reversed_relation", "portability_one_hop"),
    "side_effects": ("other_attribution", "distracting_neighbourhood"),
    "counterfact": (
        "efficacy_score", "paraphrase_score", "neighborhood_score",
        "efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude",
    ),
    "generation": ("generation_exact", "generation_contains"),
    "wild": ("reliability_wild", "generalization_wild", "locality_wild"),
    "fluency": ("fluency",),
}
# Fluency generates 100 tokens per prompt: selected explicitly, not by default.
DEFAULT_METRICS: tuple[str, ...] = tuple(g for g in GROUPS if g != "fluency")

# Summary key -> per-request record key (efficacy is a yes/no per request).
_RECORD_KEY = {"efficacy_score": "efficacy"}

# Probe kind -> metric key, for the kinds reported on their own.
PORTABILITY_METRIC = {
    "subject_alias": "portability_subject_alias",
    "reversed_relation": "portability_reversed_relation",
    "one_hop": "portability_one_hop",
}
SIDE_EFFECT_METRIC = {
    "other_attribution": "other_attribution",
    "distracting_neighborhood": "distracting_neighbourhood",
}


def is_neighbour(probe: Probe) -> bool:
    """Plain neighbourhood probe: counted by ``locality`` and the neighbourhood score."""
    return probe.kind in (None, "neighborhood")


@dataclass(frozen=True)
class Metric:
    """One aggregated score: ``value`` averaged over ``n`` requests, measured by ``protocol``."""

    name: str
    value: float
    protocol: str
    n: int


def resolve_metrics(metrics: Iterable[str]) -> frozenset[str]:
    """Group names to compute, from group names and/or individual metric keys."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    by_key = {key: g for g, keys in GROUPS.items() for key in keys}
    by_key["efficacy"] = "counterfact"
    groups = set()
    for name in metrics:
        if name in GROUPS:
            groups.add(name)
        elif name in by_key:
            groups.add(by_key[name])
        else:
            raise LmpatchError(
                f"Unknown metric {name!r}; choose from {', '.join(GROUPS)} or {', '.join(METRIC_KEYS)}."
            )
    if not groups:
        raise LmpatchError("No metrics selected; pass at least one of " + ", ".join(GROUPS) + ".")
    return frozenset(groups)


# --------------------------------------------------------------------------- measuring


@dataclass
class RequestScores:
    """Everything one pass measured for one request; metric values are derived from it."""

    rel: TargetScore | None = None
    rel_true: TargetScore | None = None
    gen: list[TargetScore] = field(default_factory=list)
    gen_true: list[TargetScore] = field(default_factory=list)
    loc: list[TargetScore] = field(default_factory=list)
    loc_new: list[TargetScore] = field(default_factory=list)
    port: list[TargetScore] = field(default_factory=list)
    port_kind: list[str | None] = field(default_factory=list)
    side: list[TargetScore] = field(default_factory=list)
    side_kind: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    fluency_texts: list[str] = field(default_factory=list)
    wild_texts: WildGenerations | None = None  # None: the wild group was not measured


def measure(
    model: LoadedModel, requests: Sequence[EditRequest], groups: frozenset[str], batch_size: int = 16
) -> list[RequestScores]:
    """One pass over ``requests``: a single batched scoring call and one generation call per
    generation-based group (``generation``, ``wild``, ``fluency``) selected."""
    cf = "counterfact" in groups
    want_rel = cf or "reliability" in groups
    want_gen = cf or "generalization" in groups
    want_loc = cf or "locality" in groups
    slots: list[tuple[int, str, str | None]] = []
    pairs: list[tuple[str, str]] = []

    def add(i: int, kind: str, prompt: str, target: str, probe_kind: str | None = None) -> None:
        slots.append((i, kind, probe_kind))
        pairs.append((prompt, target))

    for i, r in enumerate(requests):
        if want_rel:
            add(i, "rel", r.prompt, r.target_new)
        if cf and r.target_true is not None:
            add(i, "rel_true", r.prompt, r.target_true)
        for p in r.rephrase if want_gen else ():
            add(i, "gen", p, r.target_new)
            if cf and r.target_true is not None:
                add(i, "gen_true", p, r.target_true)
        for probe in r.locality:
            if is_neighbour(probe) and want_loc:
                add(i, "loc", probe.prompt, probe.answer)
                if cf:
                    add(i, "loc_new", probe.prompt, r.target_new)
            elif probe.kind in SIDE_EFFECT_METRIC and "side_effects" in groups:
                add(i, "side", probe.prompt, probe.answer, probe.kind)
        for probe in r.portability if "portability" in groups else ():
            add(i, "port", probe.prompt, probe.answer, probe.kind)

    out = [RequestScores() for _ in requests]
    for (i, kind, probe_kind), score in zip(slots, score_targets(model, pairs, batch_size=batch_size)):
        current = getattr(out[i], kind)
        if isinstance(current, list):
            current.append(score)
            if kind in ("port", "side"):
                getattr(out[i], kind + "_kind").append(probe_kind)
        else:
            setattr(out[i], kind, score)

    if "generation" in groups:
        owners, prompts, targets = [], [], []
        for i, r in enumerate(requests):
            for p in (r.prompt, *r.rephrase):
                owners.append(i)
                prompts.append(p)
                targets.append(r.target_new)
        limits = [len(pt.target_ids) + 5 for pt in encode_pairs(model, list(zip(prompts, targets)))]
        for i, text in zip(owners, generate(model, prompts, max_new_tokens=limits, batch_size=batch_size)):
            out[i].texts.append(text)
    if "fluency" in groups:
        from lmpatch.eval.fluency import generation_texts

        owners, prompts = [], []
        for i, r in enumerate(requests):
            for p in fluency_prompts(r):
                owners.append(i)
                prompts.append(p)
        for i, text in zip(owners, generation_texts(model, prompts, FLUENCY_TOKENS, batch_size=batch_size)):
            out[i].fluency_texts.append(text)
    if "wild" in groups:
        _measure_wild(model, requests, out, batch_size)
    return out


def _measure_wild(model: LoadedModel, requests: Sequence[EditRequest], out: list[RequestScores],
                  batch_size: int) -> None:
    """One batched generation over every request's prompt, rephrases and neighbourhood probes."""
    slots: list[tuple[int, str]] = []
    prompts: list[str] = []
    for i, r in enumerate(requests):
        out[i].wild_texts = WildGenerations()
        asked = [("prompt", r.prompt), *(("rephrase", p) for p in r.rephrase),
                 *(("locality", probe.prompt) for probe in r.locality if is_neighbour(probe))]
        for kind, prompt in asked:
            slots.append((i, kind))
            prompts.append(prompt)
    for (i, kind), text in zip(slots, wild.generate_raw(model, prompts, batch_size=batch_size)):
        gens = out[i].wild_texts
        if kind == "prompt":
            gens.prompt = text
        else:
            getattr(gens, kind).append(text)


def fluency_prompts(request: EditRequest) -> list[str]:
    """The prompts whose continuations fluency is measured on (distinct, in dataset order)."""
    given = request.meta.get("generation_prompts") if isinstance(request.meta, dict) else None
    prompts = list(dict.fromkeys(given)) if given else [request.prompt]
    return prompts[:FLUENCY_PROMPTS]


# --------------------------------------------------------------------------- per request


def exact_match(continuation: str, target: str) -> bool:
    """Does the stripped continuation begin with the whole stripped target (see module doc)?"""
    c, t = continuation.strip(), target.strip()
    if not c.startswith(t):
        return False
    if len(c) == len(t) or not t[-1].isalnum():
        return True
    return not c[len(t)].isalnum()


def contains_match(continuation: str, target: str) -> bool:
    return target.strip().lower() in continuation.lower()


def agreement(pre: TargetScore, post: TargetScore) -> float:
    """Fraction of positions where two passes over the same tokens pick the same argmax."""
    if pre.target != post.target:
        raise ValueError("pre and post scores were computed on different tokens")
    return sum(a == b for a, b in zip(pre.argmax, post.argmax)) / len(pre.argmax)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def request_values(
    request: EditRequest, scores: RequestScores, pre: RequestScores, groups: frozenset[str]
) -> dict[str, Any]:
    """Per-request metric values of one pass; ``pre`` is the unedited pass (itself for pre).

    A value is ``None`` when the request has nothing to measure it on (e.g. no rephrases),
    so averages over requests count only requests that contribute.
    """
    v: dict[str, Any] = {}
    if "reliability" in groups:
        v["reliability"] = scores.rel.token_accuracy
    if "generalization" in groups:
        v["generalization"] = _mean([s.token_accuracy for s in scores.gen])
    if "locality" in groups:
        v["locality"] = _mean([agreement(a, b) for a, b in zip(pre.loc, scores.loc)])
    if "portability" in groups:
        v["portability"] = _mean([s.token_accuracy for s in scores.port])
        for kind, key in PORTABILITY_METRIC.items():
            v[key] = _mean([s.token_accuracy for s, k in zip(scores.port, scores.port_kind) if k == kind])
    if "side_effects" in groups:
        for kind, key in SIDE_EFFECT_METRIC.items():
            pairs = [(a, b) for a, b, k in zip(pre.side, scores.side, scores.side_kind) if k == kind]
            v[key] = _mean([agreement(a, b) for a, b in pairs])
    if "counterfact" in groups:
        has_true = request.target_true is not None
        v["efficacy"] = (scores.rel.mean_logprob > scores.rel_true.mean_logprob) if has_true else None
        v["efficacy_magnitude"] = (scores.rel.prob - scores.rel_true.prob) if has_true else None
        para = list(zip(scores.gen, scores.gen_true))
        v["paraphrase_score"] = _mean([float(n.mean_logprob > t.mean_logprob) for n, t in para])
        v["paraphrase_magnitude"] = _mean([n.prob - t.prob for n, t in para])
        neigh = list(zip(scores.loc, scores.loc_new))
        v["neighborhood_score"] = _mean([float(a.mean_logprob > n.mean_logprob) for a, n in neigh])
        v["neighborhood_magnitude"] = _mean([a.prob - n.prob for a, n in neigh])
    if "generation" in groups:
        v["generation_exact"] = _mean([float(exact_match(t, request.target_new)) for t in scores.texts])
        v["generation_contains"] = _mean([float(contains_match(t, request.target_new)) for t in scores.texts])
        v["generations"] = list(scores.texts)
    if "wild" in groups:
        v.update(wild_values(request, scores.wild_texts, pre.wild_texts))
    if "fluency" in groups:
        from lmpatch.eval.fluency import ngram_entropy

        v["fluency"] = ngram_entropy(scores.fluency_texts) if scores.fluency_texts else None
    return v


def wild_values(
    request: EditRequest, gens: WildGenerations | None, pre: WildGenerations | None
) -> dict[str, Any]:
    """The three ``_wild`` values of one pass and its raw texts; ``pre`` is the unedited pass.

    Nothing generated (``gens`` is None) gives None values, like any metric with nothing
    to measure it on.
    """
    gens = gens or WildGenerations()
    pre = pre or WildGenerations()
    if len(gens.locality) != len(pre.locality):
        raise ValueError("pre and post generations were made for different locality prompts")
    target = request.target_new
    return {
        "reliability_wild": None if gens.prompt is None else float(wild.matches_target(gens.prompt, target)),
        "generalization_wild": _mean([float(wild.matches_target(t, target)) for t in gens.rephrase]),
        "locality_wild": _mean([float(wild.same_answer(a, b)) for a, b in zip(gens.locality, pre.locality)]),
        "wild_generations": asdict(gens),
    }


# --------------------------------------------------------------------------- aggregation


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Average per-request records (from :func:`evaluate_request`) into the metrics tables.

    Returns ``{"n", "metrics", "metrics_pre", "counts", "counts_pre", "protocols"}``:
    ``metrics`` is post-edit (empty without a patch), ``metrics_pre`` unedited; a value is
    ``None`` when no request contributed; ``counts[key]`` says how many requests did.
    """
    present = [k for k in METRIC_KEYS if any(_RECORD_KEY.get(k, k) in r.get("pre", {}) for r in records)]

    def table(side: str) -> tuple[dict[str, float | None], dict[str, int]]:
        values, counts = {}, {}
        for key in present:
            got = [r[side].get(_RECORD_KEY.get(key, key)) for r in records if side in r]
            got = [float(x) for x in got if x is not None]
            values[key] = sum(got) / len(got) if got else None
            counts[key] = len(got)
        return values, counts

    pre, pre_counts = table("pre")
    has_post = any("post" in r for r in records)
    post, post_counts = table("post") if has_post else ({}, {})
    return {
        "n": len(records),
        "metrics": post,
        "metrics_pre": pre,
        "counts": post_counts,
        "counts_pre": pre_counts,
        "protocols": {k: PROTOCOLS[k] for k in present},
    }


@dataclass
class EvalReport:
    """Pre- and post-edit metrics of a set of requests, plus each request's values."""

    pre: dict[str, Metric]
    post: dict[str, Metric]
    records: list[dict]
    method: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "n": len(self.records),
            "pre": {k: asdict(m) for k, m in self.pre.items()},
            "post": {k: asdict(m) for k, m in self.post.items()},
            "records": self.records,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def _metrics_from(values: dict[str, float | None], counts: dict[str, int]) -> dict[str, Metric]:
    return {
        k: Metric(name=k, value=v, protocol=PROTOCOLS[k], n=counts[k])
        for k, v in values.items()
        if v is not None and not math.isnan(v)
    }


def _as_patch(patch: Any) -> Any:
    """A saved patch's path read as the patch (the natural thing to pass); anything without
    ``applied`` refused by name rather than as an AttributeError mid-evaluation."""
    from lmpatch.patch import Patch

    if isinstance(patch, (str, os.PathLike)):
        return Patch.load(patch)
    if patch is not None and not callable(getattr(patch, "applied", None)):
        raise InvalidRequestError(f"patch= takes a Patch or the path of a .lmpatch file, got {type(patch).__name__}.")
    return patch


def _as_requests(requests: EditRequest | Sequence[EditRequest]) -> list[EditRequest]:
    return as_requests(requests, "evaluate")


def evaluate_records(
    model: LoadedModel,
    requests: Sequence[EditRequest],
    patch: Any = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 16,
) -> list[dict]:
    """Per-request ``{"case_id", "pre", "post"}`` records; one pre pass, one post pass.
    ``patch`` is a :class:`~lmpatch.patch.Patch` or the path of a saved one."""
    patch = _as_patch(patch)
    groups = resolve_metrics(metrics)
    pre = measure(model, requests, groups, batch_size)
    post = None
    if patch is not None:
        with patch.applied(model):
            post = measure(model, requests, groups, batch_size)
    records = []
    for i, r in enumerate(requests):
        rec: dict[str, Any] = {"case_id": r.case_id, "pre": request_values(r, pre[i], pre[i], groups)}
        if post is not None:
            rec["post"] = request_values(r, post[i], pre[i], groups)
        records.append(rec)
    return records


def evaluate(
    model: LoadedModel,
    requests: EditRequest | Sequence[EditRequest],
    patch: Any = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 16,
) -> EvalReport:
    """Measure ``requests`` on the unedited model and, if given, with ``patch`` applied.

    The patch (a :class:`~lmpatch.patch.Patch` or a saved one's path) is applied only inside
    ``patch.applied(model)``, so the model is restored afterwards even if a measurement
    fails. All prompts of all requests are scored in one batched call per pass.
    """
    reqs = _as_requests(requests)
    patch = _as_patch(patch)
    records = evaluate_records(model, reqs, patch, metrics, batch_size)
    s = summarize(records)
    return EvalReport(
        pre=_metrics_from(s["metrics_pre"], s["counts_pre"]),
        post=_metrics_from(s["metrics"], s["counts"]),
        records=records,
        method=getattr(patch, "method", None) if patch is not None else None,
        model=getattr(model, "name", None),
    )


def evaluate_request(
    model: LoadedModel,
    request: EditRequest,
    patch: Any = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 16,
) -> dict:
    """Pre and post values of one request as a JSON-able dict (what runners store per line)."""
    return evaluate_records(model, _as_requests(request), patch, metrics, batch_size)[0]
