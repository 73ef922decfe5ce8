"""Choose SERAC's number of in-context demonstrations on the tuning split only.

Each of ``--n`` records of ``counterfact-train`` from record 5000 on (never used for
reporting) is edited alone with ``lmpatch.edit(model, record, "serac", demonstrations=k)``
and scored teacher-forced: token accuracy of the new target after the edit prompt
(reliability) and after each paraphrase (generalization). ``k = 0`` is the edit alone,
stated once as its own example. The default chosen from this table is in the
``SeracHparams`` docstring (:mod:`lmpatch.methods.serac`).

    OMP_NUM_THREADS=1 python benchmarks/tune_serac.py --n 100 --demonstrations 0,16,32
"""
from __future__ import annotations

import argparse
import time

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.progress import track
from rich.table import Table

from lmpatch.cli.warmup import prepare
from lmpatch.data import load_dataset
from lmpatch.eval.scoring import score_targets
from lmpatch.methods.hparams import with_overrides
from lmpatch.methods.negatives import NEGATIVE_DATA, NEGATIVE_RECORDS
from lmpatch.methods.registry import get_method


def counts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("demonstration counts must be 0 or more")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="tuning records (default 100)")
    ap.add_argument("--offset", type=int, default=NEGATIVE_RECORDS, help="first tuning record")
    ap.add_argument("--demonstrations", type=counts, default=[0, 16, 32], help="comma-separated, e.g. 0,16,32")
    args = ap.parse_args()
    if args.offset < NEGATIVE_RECORDS:
        ap.error(f"--offset below {NEGATIVE_RECORDS} would tune on records the classifier and pool were built from")
    console = Console()
    console.print(cpu_line(cpu_info()))
    model = lmpatch.load_model()
    records = load_dataset(NEGATIVE_DATA, n=args.n, offset=args.offset)
    info = get_method("serac")
    table = Table(title=f"SERAC on {len(records)} tuning records ({NEGATIVE_DATA} {args.offset}+), one edit at a time")
    for col in ("demonstrations", "reliability", "generalization", "seconds"):
        table.add_column(col, justify="right")
    for k in args.demonstrations:
        hp = with_overrides(info.hparams, {"demonstrations": k})
        prepare(model, info, hp, show=True)
        reliability, generalization = [], []
        started = time.perf_counter()
        for r in track(records, description=f"demonstrations={k}", console=console):
            patch = lmpatch.edit(model, r, "serac", hp)
            with patch.applied(model):
                scores = score_targets(model, [(q, " " + r.target_new) for q in (r.prompt, *r.rephrase)])
            reliability.append(scores[0].token_accuracy)
            generalization += [s.token_accuracy for s in scores[1:]]
        table.add_row(str(k), f"{sum(reliability) / len(reliability):.3f}",
                      f"{sum(generalization) / len(generalization):.3f}", f"{time.perf_counter() - started:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
