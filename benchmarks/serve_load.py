"""Load on ``lmpatch serve`` while the model is edited and reverted under it.

Starts the real server (its own ledger in a temporary folder), runs ``--clients``
concurrent clients for ``--seconds`` (every other one streaming), each asking in turn
"The Eiffel Tower is located in the city of" and two unrelated prompts. A third of the way
in it posts one ROME edit (Eiffel Tower -> Rome); two thirds in, it reverts it. Prints
p50/p99 latency, time to first token (streams), tokens/s, errors, how many answers each
generation served, and whether every Eiffel answer agrees with the generation it reports
(Rome exactly while the edit is live). Run it with nothing else on the machine:

    python benchmarks/serve_load.py --clients 8 --seconds 60 --json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import lmpatch  # noqa: F401 - first: it sets lmpatch's OpenMP wait policy before torch starts its threads

# isort: split

import httpx
from lifelong import cpu_info, cpu_line  # benchmarks/ is on sys.path when this script runs

from lmpatch.serve.process import ServerProcess

EIFFEL = "The Eiffel Tower is located in the city of"
PROMPTS = [EIFFEL, "The capital of Japan is", "Water is made of hydrogen and"]
EDIT = {"prompt": EIFFEL, "subject": "The Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}
TOKEN = "load-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _client(url: str, index: int, stream: bool, stop: threading.Event, out: list, max_tokens: int) -> None:
    http = httpx.Client(timeout=300)
    turn = index
    while not stop.is_set():
        prompt = PROMPTS[turn % len(PROMPTS)]
        turn += 1
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream}
        t0 = time.perf_counter()
        row = {"prompt": prompt, "stream": stream, "start": t0}
        try:
            if stream:
                text, first, tokens_done = "", None, 0
                with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                    row["status"] = r.status_code
                    row["generation"] = int(r.headers.get("X-Lmpatch-Generation", -1))
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            row["status"] = 599
                            break
                        piece = chunk["choices"][0]["text"]
                        if piece and first is None:
                            first = time.perf_counter() - t0
                        text += piece
                        tokens_done = chunk.get("usage", {}).get("completion_tokens", tokens_done)
                row |= {"text": text, "ttft": first, "tokens": tokens_done}
            else:
                r = http.post(f"{url}/v1/completions", json=body)
                row["status"] = r.status_code
                row["generation"] = int(r.headers.get("X-Lmpatch-Generation", -1))
                if r.status_code == 200:
                    data = r.json()
                    row |= {"text": data["choices"][0]["text"], "tokens": data["usage"]["completion_tokens"]}
        except httpx.HTTPError as exc:
            row |= {"status": 0, "error": str(exc)}
        row["latency"] = time.perf_counter() - t0
        out.append(row)


def _wait(url: str, edit_id: str, states: tuple[str, ...]) -> dict:
    while True:
        rec = httpx.get(f"{url}/v1/edits/{edit_id}", timeout=60).json()
        if rec["status"] in states:
            return rec
        time.sleep(0.2)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model", default=None, help="Model for the server (default: embedded SmolLM2).")
    ap.add_argument("--max-batch", type=int, default=8, help="The server's --max-batch (1: no batching).")
    ap.add_argument("--json", action="store_true", help="Print one JSON object at the end.")
    args = ap.parse_args()
    machine = cpu_line(cpu_info())
    print(machine)
    with tempfile.TemporaryDirectory() as tmp:
        extra = (("--model", args.model) if args.model else ()) + ("--max-batch", str(args.max_batch))
        with ServerProcess(ledger=Path(tmp) / "ledger", token=TOKEN, args=extra) as server:
            url = server.url
            stop, rows = threading.Event(), []
            threads = [threading.Thread(target=_client, args=(url, i, i % 2 == 1, stop, rows, args.max_tokens))
                       for i in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(args.seconds / 3)
            r = httpx.post(f"{url}/v1/edits", json={"requests": EDIT, "method": "rome"}, headers=AUTH, timeout=60)
            edit = _wait(url, r.json()["id"], ("committed", "failed"))
            t_edit = time.perf_counter() - t0
            time.sleep(max(0.0, 2 * args.seconds / 3 - (time.perf_counter() - t0)))
            reverted = httpx.delete(f"{url}/v1/edits/{edit['id']}", headers=AUTH, timeout=300).json()
            t_revert = time.perf_counter() - t0
            time.sleep(max(0.0, args.seconds - (time.perf_counter() - t0)))
            stop.set()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0

    ok = [r for r in rows if r.get("status") == 200]
    live = {edit.get("generation_committed")}
    wrong = []
    for r in ok:
        if r["prompt"] != EIFFEL:
            continue
        rome = r["generation"] in live
        if ("Rome" in r["text"]) != rome or ("Paris" in r["text"]) == rome:
            wrong.append({"generation": r["generation"], "text": r["text"]})
    latencies = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    result = {
        "machine": machine,
        "clients": args.clients, "max_batch": args.max_batch, "seconds": round(elapsed, 1), "max_tokens": args.max_tokens,
        "requests": len(rows), "errors": len(rows) - len(ok),
        "latency_p50_s": _pct(latencies, 0.5), "latency_p99_s": _pct(latencies, 0.99),
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
        "tokens_per_s": round(sum(r.get("tokens", 0) for r in ok) / elapsed, 2),
        "answers_per_generation": dict(sorted(Counter(r["generation"] for r in ok).items())),
        "eiffel_answers": sum(r["prompt"] == EIFFEL for r in ok), "inconsistent_answers": len(wrong),
        "edit": {"status": edit["status"], "generation": edit.get("generation_committed"),
                 "committed_at_s": round(t_edit, 1), "timings": edit.get("timings")},
        "revert": {"status": reverted.get("status"), "generation": reverted.get("generation_reverted"),
                   "done_at_s": round(t_revert, 1)},
        "inconsistent_examples": wrong[:3],
    }
    for k in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
        result[k] = None if result[k] is None else round(result[k], 3)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    if result["errors"] or wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
