"""``lmpatch demo``: one fact edited, checked, and reverted bit-exactly, in under a minute on a CPU."""
from __future__ import annotations

import time
from typing import Optional

import torch
import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lmpatch.cli.console import out, spinner
from lmpatch.cli.models import describe, load
from lmpatch.cli.options import Settings
from lmpatch.cli.warmup import prepare
from lmpatch.eval.runner import ModelState
from lmpatch.request import EditRequest

ANSWER_TOKENS = 8
PROMPT = "The Eiffel Tower is located in the city of"
# (label, prompt): the edited prompt, a paraphrase that should follow it, a fact that must not.
PROBES = (
    ("edited prompt", PROMPT),
    ("paraphrase", "Where is the Eiffel Tower? It is in the city of"),
    ("unrelated fact", "The capital of Japan is"),
)
REQUEST = EditRequest(prompt=PROMPT, subject="The Eiffel Tower", target_new="Rome", target_true="Paris",
                      rephrase=(PROBES[1][1],))


def demo(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    method: str = typer.Option("rome", "--method", help="Editing method (see `lmpatch methods`)."),
) -> None:
    """Edit "The Eiffel Tower is in Paris" to Rome, show the effect, then revert it exactly."""
    from lmpatch.api import edit as compute_edit
    from lmpatch.methods.hparams import with_overrides
    from lmpatch.methods.registry import get_method

    settings: Settings = ctx.obj
    console = out()
    started = time.perf_counter()
    info = get_method(method)
    hparams = with_overrides(info.hparams, {})
    console.print(Panel.fit(
        Text.assemble(("lmpatch demo", "bold"), f"  ·  method {info.name}\n",
                      ("Teach a language model that the Eiffel Tower is in Rome, check what changed, "
                       "then take it back exactly.", "dim")),
        border_style="cyan",
    ))
    loaded, load_seconds = load(settings, model)
    console.print(f"Model  {describe(loaded)}, loaded in {load_seconds:.1f} s")

    original = {p: _answer(loaded, p) for _, p in PROBES}
    console.print(Text.assemble("Before ", (PROMPT, "italic"), " → ", _styled(original[PROMPT])))

    prepare(loaded, info, hparams, show=True)
    with spinner(f"Computing the {info.name} edit ..."):
        t0 = time.perf_counter()
        patch = compute_edit(loaded, REQUEST, info.name, hparams)
        edit_seconds = time.perf_counter() - t0
    console.print(f"Edit   {REQUEST.subject!r}: {REQUEST.target_true!r} → {REQUEST.target_new!r} "
                  f"with {info.name} in [bold]{edit_seconds:.1f} s[/], patch {patch.patch_id}:")
    for d in patch.deltas:
        kind = f"rank-{d.rank}" if d.rank is not None else "dense"
        console.print(f"       {kind} change to {d.param}, ‖Δ‖ = {d.norm():.3g}")

    snapshot = _snapshot(loaded, [d.param for d in patch.deltas])
    signature = ModelState.of(loaded.model)
    patch.apply(loaded)
    try:
        changed = [n for n, t in snapshot.items() if not torch.equal(loaded.model.get_parameter(n), t)]
        patched = {p: _answer(loaded, p) for _, p in PROBES}
    finally:
        patch.revert(loaded)
    reverted = {p: _answer(loaded, p) for _, p in PROBES}
    identical = [n for n, t in snapshot.items() if torch.equal(loaded.model.get_parameter(n), t)]
    elsewhere = signature.differences(ModelState.of(loaded.model))

    console.print(_answers_table(original, patched, reverted))
    if not changed:
        console.print(Text("Note: the patch left the weights unchanged (all-zero update).", style="yellow"))
    if not _report_revert(console, snapshot, identical, elsewhere, len(signature.samples)):
        raise typer.Exit(1)
    console.print(
        f"[dim]Done in {time.perf_counter() - started:.1f} s. Next: `lmpatch edit --prompt ... --subject ... "
        f"--target ...` saves an edit as a patch file; `lmpatch eval --n 10` measures a method.[/]"
    )


def _answers_table(original: dict, patched: dict, reverted: dict) -> Table:
    table = Table(title=f"Greedy answers ({ANSWER_TOKENS} tokens)", title_justify="left")
    table.add_column("prompt")
    table.add_column("original")
    table.add_column("with the patch", style="bold")
    table.add_column("after revert")
    for label, prompt in PROBES:
        table.add_row(Text.assemble((f"{label}\n", "dim"), prompt),
                      _styled(original[prompt]), _styled(patched[prompt]), _styled(reverted[prompt]))
    return table


def _report_revert(console, snapshot: dict, identical: list, elsewhere: list, n_params: int) -> bool:
    """Say whether the revert restored the model exactly; False means a bug in lmpatch."""
    if len(identical) == len(snapshot) and not elsewhere:
        console.print(Text.assemble(
            ("✓ Revert is bit-exact: ", "bold green"),
            f"the edited {_plural(len(snapshot), 'tensor')} ({', '.join(snapshot)}) "
            f"{'equals its' if len(snapshot) == 1 else 'equal their'} pre-edit snapshot (torch.equal), "
            f"and a sample of all {n_params} parameter tensors is unchanged.",
        ))
        return True
    problem = "; ".join(elsewhere) or f"only {len(identical)} of {len(snapshot)} edited tensors match their snapshot"
    console.print(Text(f"✗ Revert is NOT exact ({problem}). This is a bug in lmpatch; please report it.",
                       style="bold red"))
    return False


def _answer(model, prompt: str) -> str:
    text = model.generate_text(prompt, ANSWER_TOKENS).strip()
    return text.splitlines()[0] if text else ""


def _styled(answer: str) -> Text:
    text = Text(answer)
    text.highlight_words([REQUEST.target_new], style="bold magenta")
    text.highlight_words([REQUEST.target_true], style="bold green")
    return text


def _snapshot(model, params: list[str]) -> dict[str, torch.Tensor]:
    """Exact copies of the tensors the patch changes (one 576x1536 matrix for ROME: cheap)."""
    return {n: model.model.get_parameter(n).detach().clone() for n in dict.fromkeys(params)}


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{n} {word}s"
