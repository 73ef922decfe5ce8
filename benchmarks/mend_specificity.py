"""Two edit-time levers on the shipped MEND editor's specificity, without retraining.

The trained editor gives each edit a change ΔW. This script scores, on the same records:

* ``as trained``: ΔW itself (what ``lmpatch edit --method mend`` writes);
* ``smallest step, P(new) > P(true)``: α·ΔW with the smallest α on a √2 grid (2⁻³ … 2⁴)
  for which the new target beats the true one on the edit prompt - an edit that only
  just wins reaches the fewest neighbours;
* ``smallest step, argmax``: the same with the stricter test an edit without a
  ``target_true`` must use (every new-target token the argmax);
* ``off neighbour keys``: the change's inputs projected away from the keys of
  *pseudo-neighbours* (the edit prompt's template filled with ``--pool`` other subjects),
  softly, weight s²/(s² + ρ·mean s²) per singular direction, then the smallest winning
  step. The idea is ROME's: a change that does not respond to the keys the relation's
  other subjects produce should leave their answers alone.

Scored with the evaluation's CounterFact values on ``counterfact-train`` records from
5100 (never trained on by the shipped editor, and not an evaluation split), or with
``--data counterfact-edit --offset 0`` on the evaluation records, to report.

    python benchmarks/mend_specificity.py --n 100
"""
from __future__ import annotations

import argparse
import random
from contextlib import ExitStack
from dataclasses import replace

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import torch
from gradient_depth import COUNTERFACT, change_patch, change_scores  # benchmarks/ is on sys.path when this script runs
from lifelong import cpu_info, cpu_line
from rich.console import Console
from rich.table import Table

from lmpatch.data import load_dataset
from lmpatch.eval.metrics import measure, request_values
from lmpatch.methods.learned_editing import edit_modules, load_trained
from lmpatch.methods.mend import METHOD, MendHparams, new_editor
from lmpatch.methods.teacher import TARGET_NEW, request_hits, request_nll, target_batch
from lmpatch.methods.token_grads import gradient_factors
from lmpatch.model.hooks import capture_input
from lmpatch.request import EditRequest

STEPS = [2.0 ** (k / 2) for k in range(-6, 9)]


class Probe:
    """The model, the shipped editor and its matrices; scores of a scaled change."""

    def __init__(self, model) -> None:
        hp = MendHparams()
        self.model = model
        self.editor, _ = load_trained(METHOD, model, hp, lambda: new_editor(model, hp))
        self.modules = edit_modules(model, self.editor.params)

    def _scaled(self, changes, step: float):
        return [(x, step * d) for x, d in changes]

    def values(self, record, changes, factors, step: float, unedited) -> dict:
        return change_scores(self.model, self.editor.params, self.modules, record, self._scaled(changes, step),
                             factors, unedited)

    def wins(self, record, changes, factors, step: float, unedited, argmax: bool) -> bool:
        if argmax:
            patch = change_patch(self.model, self.editor.params, self.modules, record,
                                 self._scaled(changes, step), factors)
            with patch.applied(self.model), torch.no_grad():
                return request_hits(self.model, target_batch(self.model, [record], TARGET_NEW))[0]
        prompt_only = replace(record, rephrase=(), locality=())
        return bool(self.values(prompt_only, changes, factors, step, unedited)["efficacy"])

    def smallest_step(self, record, changes, factors, unedited, argmax: bool = False) -> tuple[float, dict]:
        """The smallest step of the grid that wins; a grid, not gradient_depth's bisection,
        because a trained change scaled far up can lose again."""
        step = next((s for s in STEPS if self.wins(record, changes, factors, s, unedited, argmax)), STEPS[-1])
        return step, self.values(record, changes, factors, step, unedited)

    def keys(self, requests) -> list[torch.Tensor]:
        """Every real token's input to each edited matrix, over ``requests``' prompts and new targets."""
        batch = target_batch(self.model, requests, TARGET_NEW)
        stores: list[list] = [[] for _ in self.modules]
        with ExitStack() as stack, torch.no_grad():
            for module, store in zip(self.modules, stores):
                stack.enter_context(capture_input(module, store))
            request_nll(self.model, batch)
        mask = batch.attention_mask.bool()
        return [store[0].reshape(*mask.shape, -1)[mask].float() for store in stores]


def off_keys(inputs: torch.Tensor, keys: torch.Tensor, rho: float) -> torch.Tensor:
    """``inputs`` with their components along ``keys``' row space removed, direction by direction
    in proportion s²/(s² + ρ·mean s²)."""
    _, s, vt = torch.linalg.svd(keys, full_matrices=False)
    s2 = s**2
    weight = s2 / (s2 + rho * s2.mean())
    return inputs - ((inputs @ vt.T) * weight) @ vt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--offset", type=int, default=5100)
    ap.add_argument("--data", default="counterfact-train", help="counterfact-train (tuning) or counterfact-edit (report)")
    ap.add_argument("--pool", type=int, default=16, help="pseudo-neighbour subjects per edit")
    ap.add_argument("--rho", type=float, action="append", help="projection softness (repeatable; default 1 and 10)")
    args = ap.parse_args()
    rhos = args.rho or [1.0, 10.0]
    console = Console()
    console.print(cpu_line(cpu_info()))
    model = lmpatch.load_model()
    for p in model.model.parameters():
        p.requires_grad_(False)
    probe = Probe(model)
    pool = [r.subject for r in load_dataset("counterfact-train", n=5000)]  # training subjects only
    random.Random(0).shuffle(pool)
    records = [r for r in load_dataset(args.data, n=args.n, offset=args.offset) if r.rephrase and r.locality]
    unedited = measure(model, records, COUNTERFACT)
    variants = ["as trained", "smallest step, P(new) > P(true)", "smallest step, argmax"]
    variants += [f"off neighbour keys, ρ={rho}" for rho in rhos]
    totals = {v: {"efficacy": 0.0, "paraphrase_score": 0.0, "neighborhood_score": 0.0, "steps": []} for v in variants}
    base = 0.0
    for i, (record, u) in enumerate(zip(records, unedited)):
        base += float(request_values(record, u, u, COUNTERFACT)["neighborhood_score"])
        factors, _ = gradient_factors(model, probe.modules, [record])
        with torch.no_grad():
            changes = probe.editor.changes([record], factors, False)
        template = record.prompt.replace(record.subject, "{}")
        subjects = [s for s in pool if s != record.subject][: args.pool]
        keys = probe.keys([EditRequest(prompt=template.format(s), subject=s, target_new=record.target_new)
                           for s in subjects])
        results = {variants[0]: (1.0, probe.values(record, changes, factors, 1.0, u)),
                   variants[1]: probe.smallest_step(record, changes, factors, u),
                   variants[2]: probe.smallest_step(record, changes, factors, u, argmax=True)}
        for rho, name in zip(rhos, variants[3:]):
            projected = [(off_keys(x, k, rho), d) for (x, d), k in zip(changes, keys)]
            results[name] = probe.smallest_step(record, projected, factors, u)
        for name, (step, values) in results.items():
            for k in ("efficacy", "paraphrase_score", "neighborhood_score"):
                totals[name][k] += float(values[k])
            totals[name]["steps"].append(step)
        console.print(f"record {i + 1}/{len(records)}")
    n = len(records)
    table = Table(title=f"shipped MEND editor, {n} {args.data} records from {args.offset} "
                        f"(unedited neighbourhood {base / n:.2f})")
    for col in ("variant", "efficacy", "paraphrase", "neighbourhood", "median step"):
        table.add_column(col, justify="right")
    for name, t in totals.items():
        table.add_row(name, *[f"{t[k] / n:.2f}" for k in ("efficacy", "paraphrase_score", "neighborhood_score")],
                      f"{sorted(t['steps'])[n // 2]:.3g}")
    console.print(table)


if __name__ == "__main__":
    main()
