"""Edit one fact in the embedded SmolLM2, look at it, save it, revert it.

Run: .venv/bin/python examples/quickstart.py   (first run: ~1 min of one-off, cached work)
"""
import lmpatch as lp

model = lp.load_model()  # embedded SmolLM2-135M-Instruct; or a hub id / local dir / .gguf file
req = lp.EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="The Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    rephrase=["Where is the Eiffel Tower? It is in the city of"],
    locality=[lp.Probe("The capital of Japan is", "Tokyo")],
)

patch = lp.edit(model, [req], method="rome")  # returns a Patch; the model is unchanged
print(patch)

with patch.applied(model):  # applied inside the block, reverted bit-exactly on exit
    print("patched: ", model.generate_text("The Eiffel Tower is located in the city of", max_new_tokens=8))
print("reverted:", model.generate_text("The Eiffel Tower is located in the city of", max_new_tokens=8))

path = patch.save("eiffel.lmpatch")  # one safetensors file with a JSON manifest
same = lp.Patch.load(path)
assert same.patch_id == patch.patch_id

report = lp.evaluate(model, [req], patch=patch)  # pre and post, each metric with its protocol
for name, metric in report.post.items():
    print(f"{name:24s} pre {report.pre[name].value:6.3f}  post {metric.value:6.3f}  ({metric.protocol})")
