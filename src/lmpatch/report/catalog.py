"""Which metrics a report shows, in which order, under which heading, and how to read them.

The layout follows the survey tables of Yao et al. 2023 ("Editing Large Language Models:
Problems, Methods, and Opportunities"): reliability, generalization and locality, then
portability split by probe kind, then the side effects of an edit on other knowledge
and other tasks. Scores from the ROME/MEMIT papers' CounterFact protocol, generation
checks (including QAEdit's "in the wild" reliability, generalization and locality, read
from greedy answers instead of teacher-forced tokens) and cost come after, and a key
this module has never heard of is still shown under "Other", so a new metric in a run
is never silently dropped from its report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from lmpatch.errors import LmpatchError

OTHER = "Other"
MISSING = "–"


@dataclass(frozen=True)
class MetricSpec:
    """How one metric key appears in a report.

    ``before_key`` names a separate key that holds the unedited value, for metrics that
    runs store as a before/after pair of keys (PIQA accuracy, perplexity) rather than in
    ``metrics_pre``. ``core`` rows are the survey's fixed columns, shown even when no run
    measured them so reports of different runs keep one shape. ``fraction`` metrics lie
    in [0, 1] and can share the bar chart's axis.
    """

    key: str
    section: str
    label: str
    before_key: str | None = None
    core: bool = False
    fraction: bool = True
    show_pre: bool = True
    unit: str = ""

    @property
    def heading(self) -> str:
        """The label with its section, for layouts that cannot group columns."""
        return self.label if self.label == self.section else f"{self.section}: {self.label}"


_S = MetricSpec
CATALOG: tuple[MetricSpec, ...] = (
    _S("reliability", "Reliability", "Reliability", core=True),
    _S("generalization", "Generalization", "Generalization", core=True),
    # Pre-edit locality is 1 by definition (the model agrees with itself): not worth a column.
    _S("locality", "Locality", "Locality", core=True, show_pre=False),
    _S("portability_subject_alias", "Portability", "Subject-Replace", core=True),
    _S("portability_reversed_relation", "Portability", "Reverse-Relation", core=True),
    _S("portability_one_hop", "Portability", "One-hop", core=True),
    _S("portability", "Portability", "All probes"),
    _S("multihop_accuracy", "Portability", "Multi-hop (MQuAKE)"),
    _S("other_attribution", "Side effects", "Other-Attribution", core=True),
    _S("distracting_neighbourhood", "Side effects", "Distract-Neighbour", core=True),
    _S("piqa_after", "Side effects", "Other-Task (PIQA)", before_key="piqa_before", core=True),
    _S("fluency", "Fluency", "Fluency (n-gram entropy)", fraction=False),
    _S("perplexity_after", "Fluency", "Perplexity (lower is better)", before_key="perplexity_before", fraction=False),
    _S("efficacy_score", "CounterFact", "Efficacy score"),
    _S("paraphrase_score", "CounterFact", "Paraphrase score"),
    _S("neighborhood_score", "CounterFact", "Neighborhood score"),
    _S("efficacy_magnitude", "CounterFact", "Efficacy magnitude", fraction=False),
    _S("paraphrase_magnitude", "CounterFact", "Paraphrase magnitude", fraction=False),
    _S("neighborhood_magnitude", "CounterFact", "Neighborhood magnitude", fraction=False),
    _S("generation_exact", "Generation", "Exact match"),
    _S("generation_contains", "Generation", "Contains target"),
    _S("reliability_wild", "In the wild", "Reliability"),
    _S("generalization_wild", "In the wild", "Generalization"),
    # As for locality: before the edit the model gives its own answers, 1 by definition.
    _S("locality_wild", "In the wild", "Locality", show_pre=False),
    _S("edit_seconds_median", "Cost", "Edit time, median", fraction=False, show_pre=False, unit=" s"),
    _S("edit_seconds_p90", "Cost", "Edit time, p90", fraction=False, show_pre=False, unit=" s"),
    _S("edit_seconds_total", "Cost", "Edit time, total", fraction=False, show_pre=False, unit=" s"),
    _S("peak_rss_mb", "Cost", "Peak RSS", fraction=False, show_pre=False, unit=" MB"),
)
_BY_KEY = {s.key: s for s in CATALOG}
_BY_BEFORE_KEY = {s.before_key: s for s in CATALOG if s.before_key}

# Short tags for the protocols lmpatch writes, so a table cell can say how it was measured.
PROTOCOL_NOTES: dict[str, tuple[str, str]] = {
    "teacher_forced_token_accuracy": ("TF", "teacher-forced token accuracy of the answer (EasyEdit's protocol)"),
    "probability_comparison": ("PC", "probability comparison of the new vs the true target (ROME/MEMIT papers)"),
    "pre_post_agreement": ("AG", "fraction of answer tokens whose argmax the edit leaves unchanged"),
    "generation_exact_match": ("GE", "greedy continuation starts with the target"),
    "generation_contains": ("GC", "greedy continuation contains the target"),
    "generation_wild_exact_match": (
        "GW",
        "greedy answer to the prompt alone (at most 50 tokens, cut at the first '.' or newline), "
        "SQuAD-normalised, equals the target, or for locality the unedited model's answer "
        "(QAEdit, Yang et al. 2025)",
    ),
}


def spec_for(key: str) -> MetricSpec:
    """The spec of ``key``; unknown keys get a plain one under "Other"."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    if key in _BY_BEFORE_KEY:
        return _BY_BEFORE_KEY[key]
    return MetricSpec(key, OTHER, key, fraction=False)


def select(present: Iterable[str], wanted: Sequence[str] | None = None) -> list[MetricSpec]:
    """Rows of a report: catalogue order first, then unknown keys alphabetically.

    Without ``wanted`` that is every core row plus every key some run has. With it, only
    the named keys (a before/after key selects its pair); a name that is neither in the
    catalogue nor in any run is a typo, and saying so beats an empty table.
    """
    present = set(present)
    if wanted:
        known = set(_BY_KEY) | set(_BY_BEFORE_KEY) | present
        unknown = [k for k in wanted if k not in known]
        if unknown:
            available = ", ".join(s.key for s in select(present)) or "none"
            raise LmpatchError(
                f"Unknown metric {', '.join(map(repr, unknown))}; these runs have: {available}."
            )
        chosen = {spec_for(k).key for k in wanted}
    else:
        chosen = {spec_for(k).key for k in present} | {s.key for s in CATALOG if s.core}
    known_rows = [s for s in CATALOG if s.key in chosen]
    other_rows = [spec_for(k) for k in sorted(chosen - set(_BY_KEY))]
    return known_rows + other_rows


def is_number(value: Any) -> bool:
    """A finite int/float (bools count: per-request yes/no metrics average to fractions)."""
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def pre_post(metrics: Mapping[str, Any], metrics_pre: Mapping[str, Any], spec: MetricSpec) -> tuple[Any, Any]:
    """The (unedited, edited) values of ``spec`` from a summary's two tables; None if absent.

    Before/after pairs may be stored either as two keys of ``metrics`` or with the
    before value under ``metrics_pre``; both are accepted.
    """
    post = metrics.get(spec.key)
    if spec.before_key:
        pre = metrics.get(spec.before_key)
        if pre is None:
            pre = metrics_pre.get(spec.before_key, metrics_pre.get(spec.key))
    else:
        pre = metrics_pre.get(spec.key) if spec.show_pre else None
    return pre, post


def format_value(value: Any, spec: MetricSpec) -> str:
    """A compact cell text: three decimals for fractions, fewer as numbers grow."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, (int, float)):
        magnitude = abs(value)
        text = f"{value:.1f}" if magnitude >= 100 else f"{value:.2f}" if magnitude >= 10 or spec.unit else f"{value:.3f}"
        return text + spec.unit
    text = str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def protocol_tag(protocol: str, extra: dict[str, str]) -> str:
    """The short tag of ``protocol``; unknown protocols get P1, P2, ... in order of first use."""
    if protocol in PROTOCOL_NOTES:
        return PROTOCOL_NOTES[protocol][0]
    if protocol not in extra:
        extra[protocol] = f"P{len(extra) + 1}"
    return extra[protocol]


def protocol_description(protocol: str) -> str:
    return PROTOCOL_NOTES[protocol][1] if protocol in PROTOCOL_NOTES else protocol.replace("_", " ")
