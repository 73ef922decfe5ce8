"""``lmpatch generate``: greedy answers of a model with any stack of patches applied.

What a user runs to see what a patch does to their prompts, and what the application jobs'
benchmarks read. Patches are applied in the order given, as :class:`~lmpatch.patch.PatchStack`
would apply them in Python; the model on disk is never changed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from lmpatch.cli.console import out, print_json
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, check_file
from lmpatch.errors import LmpatchError

#: prompts per generate call: the bar moves, and the length-sorted batching still pays off
CHUNK = 16


def generate(
    ctx: typer.Context,
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts", help='JSONL file: one {"prompt": ...} object (or JSON string) per line.'),
    patch: Optional[list[Path]] = typer.Option(None, "--patch", help="Patch file to apply first (repeatable, in order)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap prompts in the model's chat template."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Most tokens generated per prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else."),
) -> None:
    """Greedy generations for prompts, with patches applied (one line each)."""
    from lmpatch.eval.scoring import generate as greedy
    from lmpatch.patch import Patch
    from lmpatch.progress import progress_bar

    texts = _prompts(prompt, prompts_file)
    patches = [Patch.load(check_file(p, "Patch file")) for p in patch or ()]  # bad files fail before loading
    for k, p in enumerate(patches):
        if any(p.patch_id == q.patch_id for q in patches[:k]):
            raise LmpatchError(f"--patch {patch[k]} is given twice (patch {p.patch_id}); give each patch once.")
    settings: Settings = ctx.obj
    loaded, _ = load(settings, model, chat=chat, show=not as_json)
    for p in patches:
        p.apply(loaded)
    answers: list[str] = []
    with progress_bar(len(texts) > CHUNK and not as_json, "generating", len(texts), "prompts") as advance:
        for start in range(0, len(texts), CHUNK):
            chunk = texts[start : start + CHUNK]
            answers += greedy(loaded, chunk, max_new_tokens=max_new_tokens)
            advance(len(chunk))
    rows = [{"prompt": p, "text": t} for p, t in zip(texts, answers)]
    if as_json:
        print_json(json.dumps({"generations": rows, "model": loaded.name,
                               "patches": [p.patch_id for p in patches]}, ensure_ascii=False))
        return
    console = out()
    for row in rows:
        text = _one_line(row["text"])
        gap = "" if text[:1].isspace() or row["prompt"][-1:].isspace() else " "  # the answer often brings its own
        console.print(f"[bold]{escape(_one_line(row['prompt']))}[/]{gap}{escape(text)}", soft_wrap=True)


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\\n")


def _prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The prompts from ``--prompt`` or ``--prompts``, or the one error that says what is wrong."""
    if bool(prompt) == (prompts_file is not None):
        raise LmpatchError("Give either --prompt (repeatable) or --prompts FILE.jsonl, not both or neither.")
    if prompt:
        texts = list(prompt)
    else:
        texts = []
        path = check_file(prompts_file, "Prompts file")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                texts.append(_prompt_of(line, path, number))
        if not texts:
            raise LmpatchError(f"Prompts file '{path}' holds no prompts.")
    empty = [i for i, t in enumerate(texts, 1) if not t.strip()]
    if empty:
        raise LmpatchError(f"Prompt {empty[0]} is empty.")
    return texts


def _prompt_of(line: str, path: Path, number: int) -> str:
    where = f"'{path}' line {number}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LmpatchError(f"{where} is not JSON ({exc.msg}); write one {{\"prompt\": ...}} object per line.") from None
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str):
        raise LmpatchError(f'{where} has no "prompt" string; write one {{"prompt": ...}} object per line.')
    return value
