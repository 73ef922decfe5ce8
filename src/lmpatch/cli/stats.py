"""``lmpatch stats``: compute or list the cached second-moment statistics of MLP keys."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from lmpatch.cli.console import out, print_json
from lmpatch.cli.models import load
from lmpatch.cli.options import Settings, parse_layers


def stats(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, model dir or .gguf (default: embedded SmolLM2)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers, e.g. 5,6 or 4-8 (default: ROME's edit layer)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="Tokens to estimate from (default: ROME's, 100,000)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="wikitext-2-raw (shipped), a text file, or hf:NAME[:CONFIG][:SPLIT]."),
    list_only: bool = typer.Option(False, "--list", help="List cached statistics instead of computing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Compute key statistics once (with a progress bar) so later edits start at once."""
    from lmpatch.stats import StatsConfig, cached_stats, second_moments, stats_path

    if list_only:
        _print_cached(cached_stats(), as_json)
        return
    from lmpatch.methods.rome import ROMEHparams, edit_layer

    settings: Settings = ctx.obj
    defaults = ROMEHparams()
    config = StatsConfig(corpus=corpus or defaults.stats_corpus, n_tokens=tokens or defaults.stats_tokens)
    asked = parse_layers(layers)
    loaded, _ = load(settings, model)
    wanted = asked or [edit_layer(loaded, defaults)]
    wanted = sorted({loaded.spec.check_layer(layer) for layer in wanted})
    was_cached = {layer: stats_path(loaded, layer, config).is_file() for layer in wanted}
    moments = second_moments(loaded, wanted, config, progress=True)
    rows = [
        {"layer": layer, "d_ff": m.d_ff, "count": m.count, "cached_before": was_cached[layer],
         "path": str(m.path) if m.path else None}
        for layer, m in moments.items()
    ]
    if as_json:
        print_json(json.dumps({"model": loaded.name, "fingerprint": loaded.fingerprint, "corpus": config.corpus,
                               "n_tokens": config.n_tokens, "layers": rows}))
        return
    table = Table(title=f"Key statistics for {loaded.name} ({config.corpus}, {config.n_tokens:,} tokens)",
                  title_justify="left")
    for col in ("layer", "d_ff", "tokens", "status", "file"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["layer"]), str(r["d_ff"]), f"{r['count']:,}",
                      "was cached" if r["cached_before"] else "computed", r["path"] or "(not cached)")
    out().print(table)


def _print_cached(entries: list[dict], as_json: bool) -> None:
    if as_json:
        print_json(json.dumps(entries, default=str))
        return
    if not entries:
        out().print("No cached statistics yet; compute them with [bold]lmpatch stats --layers N[/].")
        return
    table = Table(title=f"{len(entries)} cached statistics file(s)", title_justify="left")
    for col in ("model", "fingerprint", "kind", "layer", "corpus", "tokens", "dtype", "MB"):
        table.add_column(col)
    for e in entries:
        table.add_row(
            str(e.get("model", "")), e["fingerprint"], str(e.get("kind", "")), str(e.get("layer", "")),
            str(e.get("corpus", "")), f"{e['count']:,}" if isinstance(e.get("count"), int) else "",
            str(e.get("dtype", "")), f"{e['bytes'] / 1e6:.1f}",
        )
    out().print(table)
