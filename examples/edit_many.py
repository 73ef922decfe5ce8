"""Edit several facts from a requests file into one patch, then measure it pre vs post.

Run: .venv/bin/python examples/edit_many.py [examples/requests.json] [method]
The same file works on the command line:
    lmpatch edit --requests examples/requests.json
    lmpatch eval --data examples/requests.json --n 3
"""
import sys
from pathlib import Path

import lmpatch as lp
from lmpatch.data import load_dataset

path = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("requests.json")
method = sys.argv[2] if len(sys.argv) > 2 else "rome"

model = lp.load_model()
requests = load_dataset(path)  # lmpatch, ROME CounterFact, EasyEdit or zsRE records
patch = lp.edit(model, requests, method=method)  # ROME edits them one after another, composed
print(patch, "rank", [d.rank for d in patch.deltas])

report = lp.evaluate(model, requests, patch=patch)
print(f"{'metric':24s} {'pre':>6s} {'post':>6s}  protocol")
for name, post in report.post.items():
    print(f"{name:24s} {report.pre[name].value:6.3f} {post.value:6.3f}  {post.protocol}")
print("saved to", patch.save(f"requests-{method}.lmpatch"))
