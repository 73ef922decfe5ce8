"""How long one MEND (or KE) edit takes, and one call with many edits, on a quiet machine.

Median over ``--n`` single edits of the first ``counterfact-edit`` records (each from the
unedited model, patch built but not applied), then one call with all of them (the
paper's batched edit, one patch). The editor must be trained or shipped. Run it with
nothing else on the machine: every number is printed with the CPU it was measured on.

    OMP_NUM_THREADS=1 python benchmarks/learned_edit_speed.py --method mend --n 100
"""
from __future__ import annotations

import argparse
import statistics
import time

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs

from lmpatch.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mend")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--data", default="counterfact-edit")
    args = ap.parse_args()
    print(cpu_line(cpu_info()))
    model = lmpatch.load_model()
    requests = load_dataset(args.data, n=args.n)
    lmpatch.edit(model, requests[0], args.method)  # warm-up: first-call costs are not an edit's
    times = []
    for r in requests:
        t0 = time.perf_counter()
        lmpatch.edit(model, r, args.method)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    patch = lmpatch.edit(model, requests, args.method)
    batch = time.perf_counter() - t0
    kinds = sorted({p.kind if p.rank is None else f"rank {p.rank}" for p in patch.parts})
    print(f"{args.method}: single edit median {statistics.median(times):.3f} s, p90 "
          f"{statistics.quantiles(times, n=10)[-1]:.3f} s over {len(times)} edits; one call of {len(requests)} "
          f"edits {batch:.2f} s ({batch / len(requests):.3f} s per edit), patch of {len(patch.parts)} deltas "
          f"({', '.join(kinds)})")


if __name__ == "__main__":
    main()
