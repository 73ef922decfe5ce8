"""What retrieval costs a memory-based editor per prompt: one index lookup plus one embedding.

Lookup: ExactIndex (and FAISS IndexFlatIP when ``faiss`` is installed) over 1k, 10k and
100k stored edits, one query at a time (batch size 1, as during generation). Keys and
queries are random unit vectors of MiniLM's dimension 384: search cost depends on the
number and size of the keys, not on what they mean. Embedding: one query sentence
through MiniLM with its per-text cache off, so every call runs the model.

    OMP_NUM_THREADS=1 python benchmarks/retrieval_cost.py
    python benchmarks/retrieval_cost.py --sizes 1000,100000 --queries 500
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import torch
from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs
from rich.console import Console
from rich.table import Table

from lmpatch.memory.embedder import EmbedderConfig, MiniLMEmbedder
from lmpatch.memory.index import ExactIndex, FaissIndex, faiss_available

DIM = 384
SENTENCES = (
    "Where is the Eiffel Tower?", "Who is the head of state of Canada?", "The mother tongue of Danielle Darrieux is",
    "What sport does Lionel Messi play?", "Which company developed the iPhone?", "Toko Yasuda plays the",
    "In which city did the Beatles form?", "The official language of Brazil is",
)


def unit(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1)


def p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def time_lookups(index, queries: torch.Tensor, k: int) -> list[float]:
    """Seconds per single-query search, after a few unmeasured warm-up searches."""
    for q in queries[:5]:
        index.search(q[None], k)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000", help="stored edits, comma-separated")
    ap.add_argument("--queries", type=int, default=200, help="lookups timed per index (batch size 1)")
    ap.add_argument("--k", type=int, default=1, help="neighbours per lookup")
    ap.add_argument("--sentences", type=int, default=50, help="single-sentence embeddings timed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"CPU: {cpu_line(cpu_info())}", soft_wrap=True)
    console.print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}  "
                  f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')}")

    backends: list[tuple[str, type]] = [("exact (torch)", ExactIndex)]
    if faiss_available():
        backends.append(("faiss IndexFlatIP", FaissIndex))
    table = Table(title=f"Lookup time per query: batch size 1, k={args.k}, {args.queries} queries; "
                        f"random unit keys and queries, dim {DIM}")
    for col in ("backend", "stored edits", "keys MB", "build ms", "median µs", "p90 µs"):
        table.add_column(col, justify="right")
    queries = unit(args.queries, seed=1)
    for size in (int(s) for s in args.sizes.split(",")):
        keys = unit(size, seed=size)
        for label, cls in backends:
            t0 = time.perf_counter()
            index = cls(keys)
            build = time.perf_counter() - t0
            times = time_lookups(index, queries, args.k)
            table.add_row(label, f"{size:,}", f"{keys.numel() * 4 / 1e6:.0f}", f"{build * 1e3:.1f}",
                          f"{statistics.median(times) * 1e6:.0f}", f"{p90(times) * 1e6:.0f}")
            del index
    console.print(table)
    if not faiss_available():
        console.print("FAISS: not installed (pip install faiss-cpu), not measured.")

    t0 = time.perf_counter()
    embedder = MiniLMEmbedder(config=EmbedderConfig(cache_size=0))
    load = time.perf_counter() - t0
    embedder.embed(["warm-up sentence"])
    times = []
    for i in range(args.sentences):
        text = SENTENCES[i % len(SENTENCES)]
        t0 = time.perf_counter()
        embedder.embed([text])
        times.append(time.perf_counter() - t0)
    console.print(f"MiniLM ({embedder.id}): load {load:.2f} s; one query sentence, cache off: "
                  f"median {statistics.median(times) * 1e3:.1f} ms, p90 {p90(times) * 1e3:.1f} ms "
                  f"over {len(times)} calls (torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
