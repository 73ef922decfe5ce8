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
from dataclasses import replace

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import torch
from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.data import load_dataset
from lmpatch.eval.metrics import measure, request_values
from lmpatch.methods.learned_editing import MODULE_KINDS, edit_modules, layer_params, weight_deltas
from lmpatch.methods.locate.solve import KeyCovariance, layer_covariances
from lmpatch.methods.token_grads import TokenFactors, gradient_factors
from lmpatch.patch import Patch
from lmpatch.stats.covariance import StatsConfig
from lmpatch.tokens import subject_last_index

LAYER_SETS = ((27, 28, 29), (20, 21, 22), (12, 13, 14), (6, 7, 8))
COUNTERFACT = frozenset({"counterfact"})


def change_patch(model, params, modules, record, changes, factors: list[TokenFactors]) -> Patch:
    """The per-matrix (U, D) ``changes`` of one record's edit as a weight-delta patch."""
    return Patch(parts=weight_deltas(params, modules, changes, factors), method="probe",
                 model_fingerprint=model.fingerprint, model_name=model.name, requests=[record])


def change_scores(model, params, modules, record, changes, factors: list[TokenFactors], unedited) -> dict:
    """The evaluation's CounterFact values (efficacy, paraphrase_score, neighborhood_score)
    with ``changes`` applied as a patch."""
    with change_patch(model, params, modules, record, changes, factors).applied(model):
        edited = measure(model, [record], COUNTERFACT)[0]
    return request_values(record, edited, unedited, COUNTERFACT)


def scores_at(model, params, modules, record, factors: list[TokenFactors], step: float, unedited) -> dict:
    """:func:`change_scores` of the gradient step ΔW = -step ∇W."""
    changes = [(f.inputs, -step * f.grads) for f in factors]
    return change_scores(model, params, modules, record, changes, factors, unedited)


def at_subject(model, record, factors: list[TokenFactors]) -> list[TokenFactors]:
    """The factors with every token but the subject's last masked out (one record per batch)."""
    text = model.format_prompt(record.prompt)
    last = subject_last_index(model.tokenizer, text, record.subject, start=max(text.find(record.prompt), 0))
    keep = torch.zeros_like(factors[0].mask)
    keep[:, last] = True
    return [TokenFactors(f.inputs, f.grads, f.mask & keep) for f in factors]


def whitened(factors: list[TokenFactors], covariances: list[KeyCovariance]) -> list[TokenFactors]:
    """Each input x replaced by C0⁻¹x, rescaled to the inputs' norm so the step search keeps its range."""
    out = []
    for f, cov in zip(factors, covariances):
        rows, tokens, d_in = f.inputs.shape
        x = cov.solve(f.inputs.reshape(-1, d_in).T).T.float().reshape(rows, tokens, d_in)
        out.append(TokenFactors(x * (f.inputs.norm() / x.norm().clamp_min(1e-30)), f.grads, f.mask))
    return out


def smallest_winning_step(model, params, modules, record, factors, unedited, lo=-30.0, hi=10.0, rounds=12):
    """Bisection on log2(step) for the smallest step that wins the edit prompt; its scores.

    The rounds score the edit prompt alone (the record without its paraphrases and
    neighbours); only the step found is scored on everything.
    """
    prompt_only = replace(record, rephrase=(), locality=())
    for _ in range(rounds):
        mid = (lo + hi) / 2
        if scores_at(model, params, modules, prompt_only, factors, 2.0 ** mid, unedited)["efficacy"]:
            hi = mid
        else:
            lo = mid
    return 2.0 ** hi, scores_at(model, params, modules, record, factors, 2.0 ** hi, unedited)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--offset", type=int, default=5100)
    ap.add_argument("--layers", action="append", help="comma-separated layer set (repeatable)")
    ap.add_argument("--modules", default="mlp_in,mlp_out", help=f"comma-separated, of {', '.join(MODULE_KINDS)}")
    ap.add_argument("--positions", choices=("all", "subject"), default="all")
    ap.add_argument("--whiten", action="store_true", help="inputs through C0⁻¹ (needs --modules mlp_out)")
    args = ap.parse_args()
    kinds = tuple(args.modules.split(","))
    if args.whiten and kinds != ("mlp_out",):
        ap.error("--whiten needs --modules mlp_out: only the down projections' keys have statistics")
    layer_sets = [tuple(int(x) for x in s.split(",")) for s in args.layers] if args.layers else LAYER_SETS
    console = Console()
    console.print(cpu_line(cpu_info()))
    torch.set_num_threads(1)
    model = lmpatch.load_model()
    for p in model.model.parameters():
        p.requires_grad_(False)
    records = [r for r in load_dataset("counterfact-train", n=args.n, offset=args.offset) if r.rephrase and r.locality]
    unedited = measure(model, records, COUNTERFACT)  # once: no layer set changes the unedited model
    base = [request_values(r, u, u, COUNTERFACT)["neighborhood_score"] for r, u in zip(records, unedited)]
    variant = f"{args.modules}, {args.positions} tokens{', whitened' if args.whiten else ''}"
    table = Table(title=f"one gradient step per edit, the smallest that wins on the edit prompt "
                        f"({len(records)} records; {variant})")
    for col in ("layers", "efficacy", "paraphrase", "neighbourhood", "unedited nbhd", "median step"):
        table.add_column(col, justify="right")
    for layers in layer_sets:
        params = layer_params(model, layers, kinds)
        modules = edit_modules(model, params)
        if args.whiten:
            covariances = list(layer_covariances(model, layers, StatsConfig()).values())  # in layer order
        totals = {"efficacy": 0.0, "paraphrase_score": 0.0, "neighborhood_score": 0.0}
        steps = []
        for r, u in zip(records, unedited):
            factors, _ = gradient_factors(model, modules, [r])
            if args.positions == "subject":
                factors = at_subject(model, r, factors)
            if args.whiten:
                factors = whitened(factors, covariances)
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
