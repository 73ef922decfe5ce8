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
from lmpatch.methods.learned_editing import edit_modules, top_layer_params
from lmpatch.methods.teacher import TARGET_NEW, request_nll, target_batch
from lmpatch.methods.token_grads import TokenFactors, gradient_factors, row_deltas
from lmpatch.request import EditRequest

LAYER_SETS = ((27, 28, 29), (20, 21, 22), (12, 13, 14), (6, 7, 8))


def new_wins(model, modules, record, prompts: list[str], factors: list[TokenFactors] | None, step: float) -> list[bool]:
    """For each prompt, whether the new target's mean NLL is below the true one's, with the
    gradient step ``step`` applied (no edit when ``factors`` is None)."""
    changes = [] if factors is None else [
        (f.inputs * f.mask.unsqueeze(-1), -step * f.grads * f.mask.unsqueeze(-1)) for f in factors
    ]
    n = len(prompts)
    changes = [(u.expand(n, -1, -1), d.expand(n, -1, -1)) for u, d in changes]
    nll = {}
    for which in ("target_new", "target_true"):
        reqs = [EditRequest(prompt=p, subject=p, target_new=getattr(record, which)) for p in prompts]
        with torch.no_grad(), row_deltas(modules if changes else [], changes):
            nll[which] = request_nll(model, target_batch(model, reqs, TARGET_NEW))
    return (nll["target_new"] < nll["target_true"]).tolist()


def smallest_winning_step(model, modules, record, factors, lo: float = -30.0, hi: float = 10.0, rounds: int = 12):
    """Bisection on log2(step) for the smallest step whose edit wins on the edit prompt."""
    for _ in range(rounds):
        mid = (lo + hi) / 2
        if new_wins(model, modules, record, [record.prompt], factors, 2.0 ** mid)[0]:
            hi = mid
        else:
            lo = mid
    return 2.0 ** hi


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
    table = Table(title=f"one gradient step per edit, the smallest that wins on the edit prompt ({len(records)} records)")
    for col in ("layers", "efficacy", "paraphrase", "neighbourhood", "unedited nbhd", "median step"):
        table.add_column(col, justify="right")
    for layers in LAYER_SETS:
        modules = edit_modules(model, top_layer_params(model, len(layers), ("mlp_in", "mlp_out"), layers))
        eff = para = nbhd = base = 0.0
        steps = []
        for r in records:
            prompts = [r.prompt, r.rephrase[0], *[probe.prompt for probe in r.locality]]
            before = new_wins(model, modules, r, prompts[2:], None, 0.0)
            base += sum(not w for w in before) / len(before)
            factors, _ = gradient_factors(model, modules, [r])
            step = smallest_winning_step(model, modules, r, factors)
            won = new_wins(model, modules, r, prompts, factors, step)
            steps.append(step)
            eff += won[0]
            para += won[1]
            nbhd += sum(not w for w in won[2:]) / len(won[2:])
        n = len(records)
        table.add_row("-".join(map(str, (layers[0], layers[-1]))), f"{eff / n:.2f}", f"{para / n:.2f}",
                      f"{nbhd / n:.2f}", f"{base / n:.2f}", f"{sorted(steps)[n // 2]:.3g}")
        console.print(f"layers {layers} done")
    console.print(table)


if __name__ == "__main__":
    main()
