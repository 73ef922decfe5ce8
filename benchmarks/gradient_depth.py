"""How specific is a plain gradient edit at different depths? (Why MEND's layers matter.)

For each set of layers, each record is edited by one step of its own fine-tuning gradient
at those layers' MLP matrices (gate, up, down), ΔW = -s ∇W, with the smallest step s that
makes the new target beat the true one on the edit prompt (bisection on log2 s). At that
step the script counts the paraphrases the edit also wins and the neighbour prompts (same
relation, another subject, the same true answer) where the true answer still wins.

This is MEND with an untrained, identity network: what its trained network starts from.
A set of layers where the barely-sufficient gradient step already reaches the neighbours
asks the network to undo that; one where it does not leaves the network generalising the
edit instead. Records come from ``counterfact-train`` (5100 on: never trained on by the
shipped editors, and not an evaluation split).

    OMP_NUM_THREADS=1 python benchmarks/gradient_depth.py --n 40
"""
from __future__ import annotations

import argparse

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import torch
from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.data import load_dataset
from lmpatch.eval.metrics import measure, request_values
from lmpatch.methods.learned_editing import edit_modules, layer_params, weight_deltas
from lmpatch.methods.token_grads import TokenFactors, gradient_factors
from lmpatch.patch import Patch

LAYER_SETS = ((27, 28, 29), (20, 21, 22), (12, 13, 14), (6, 7, 8))
COUNTERFACT = frozenset({"counterfact"})


def scores_at(model, params, modules, record, factors: list[TokenFactors], step: float, unedited) -> dict:
    """The evaluation's CounterFact values (efficacy, paraphrase_score, neighborhood_score)
    with the gradient step ΔW = -step ∇W applied as a patch."""
    changes = [(f.inputs, -step * f.grads) for f in factors]
    patch = Patch(parts=weight_deltas(params, modules, changes, factors), method="gradient-step",
                  model_fingerprint=model.fingerprint, model_name=model.name, requests=[record])
    with patch.applied(model):
        edited = measure(model, [record], COUNTERFACT)[0]
    return request_values(record, edited, unedited, COUNTERFACT)


def smallest_winning_step(model, params, modules, record, factors, unedited, lo=-30.0, hi=10.0, rounds=12):
    """Bisection on log2(step) for the smallest step that wins the edit prompt; its scores."""
    best = None
    for _ in range(rounds):
        mid = (lo + hi) / 2
        values = scores_at(model, params, modules, record, factors, 2.0 ** mid, unedited)
        if values["efficacy"]:
            hi, best = mid, values
        else:
            lo = mid
    return 2.0 ** hi, best or scores_at(model, params, modules, record, factors, 2.0 ** hi, unedited)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--offset", type=int, default=5100)
    args = ap.parse_args()
    console = Console()
    console.print(cpu_line(cpu_info()))
    torch.set_num_threads(1)
    model = lmpatch.load_model()
    for p in model.model.parameters():
        p.requires_grad_(False)
    records = [r for r in load_dataset("counterfact-train", n=args.n, offset=args.offset) if r.rephrase and r.locality]
    unedited = measure(model, records, COUNTERFACT)  # once: no layer set changes the unedited model
    base = [request_values(r, u, u, COUNTERFACT)["neighborhood_score"] for r, u in zip(records, unedited)]
    table = Table(title=f"one gradient step per edit, the smallest that wins on the edit prompt ({len(records)} records)")
    for col in ("layers", "efficacy", "paraphrase", "neighbourhood", "unedited nbhd", "median step"):
        table.add_column(col, justify="right")
    for layers in LAYER_SETS:
        params = layer_params(model, layers, ("mlp_in", "mlp_out"))
        modules = edit_modules(model, params)
        totals = {"efficacy": 0.0, "paraphrase_score": 0.0, "neighborhood_score": 0.0}
        steps = []
        for r, u in zip(records, unedited):
            factors, _ = gradient_factors(model, modules, [r])
            step, values = smallest_winning_step(model, params, modules, r, factors, u)
            steps.append(step)
            for k in totals:
                totals[k] += float(values[k])
        n = len(records)
        table.add_row(f"{layers[0]}-{layers[-1]}", *[f"{totals[k] / n:.2f}" for k in totals],
                      f"{sum(base) / n:.2f}", f"{sorted(steps)[n // 2]:.3g}")
        console.print(f"layers {layers} done")
    console.print(table)


if __name__ == "__main__":
    main()
