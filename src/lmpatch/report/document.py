"""A report as files: ``report.md`` and/or a standalone ``report.html``, plus the PNG plots.

The HTML page embeds its plots as base64 data so it is one self-contained file that
can be mailed or attached to an issue; the markdown links the PNGs next to it, which
is how GitHub and most viewers show images in markdown.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lmpatch.errors import LmpatchError
from lmpatch.fileio import atomic_write_text
from lmpatch.report.plots import Plot, plot_bars, plot_curves
from lmpatch.report.runs import Run, load_runs
from lmpatch.report.table import ReportTable, build_table, check_layout, to_html, to_markdown

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
FORMATS = {"md": ("md",), "html": ("html",), "both": ("md", "html")}
TITLE = "lmpatch report"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table.runs { border-collapse: collapse; font-size: 0.9rem; }
table.runs th, table.runs td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; }
table.runs thead th { background: #f0f3f7; vertical-align: bottom; }
table.runs td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.runs th.group { background: #f7f7f7; text-align: left; vertical-align: top; }
table.runs th.metric { text-align: left; font-weight: normal; }
table.runs td.missing { color: #aaa; text-align: center; }
.detail { font-weight: normal; font-size: 0.8rem; color: #555; }
.tag { font-size: 0.7rem; color: #36c; border: 1px solid #9bd; border-radius: 3px; padding: 0 0.2rem; }
ul.notes, ul.runs { font-size: 0.85rem; color: #444; }
figure { display: inline-block; margin: 0.5rem 1rem 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8rem; color: #555; }
"""


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote, and the table to show on a terminal."""

    markdown: Path | None
    html: Path | None
    plots: tuple[Plot, ...]
    table_markdown: str
    legend: tuple[str, ...]


def formats_of(fmt: str) -> tuple[str, ...]:
    if fmt not in FORMATS:
        raise LmpatchError(f"Unknown report format {fmt!r}; choose md, html or both.")
    return FORMATS[fmt]


def _run_lines(runs: Sequence[Run], table: ReportTable) -> list[str]:
    """One plain-text line per run: where it came from and what it measured."""
    lines = []
    for run, header in zip(runs, table.headers):
        facts = [f"model {run.model}" if run.model else None,
                 f"fingerprint {run.fingerprint}" if run.fingerprint else None,
                 f"{len(run.curve)} curve checkpoints" if run.curve else None,
                 None if run.complete else "unfinished: summarised from its records"]
        # The run directory's name only: a report is shared, the machine's paths are not.
        lines.append(f"{header.text}: run {Path(run.path).name}" + "".join(f"; {f}" for f in facts if f))
    return lines


def render_markdown(runs: Sequence[Run], table: ReportTable, plots: Sequence[Plot], out_dir: Path,
                    layout: str = "columns") -> str:
    parts = [f"# {TITLE}", "", "Runs:", ""]
    parts += [f"- {line}" for line in _run_lines(runs, table)]
    parts += ["", to_markdown(table, layout), ""]
    parts += [f"- {note}" for note in table.notes()]
    if plots:
        parts += ["", "## Plots", ""]
        for plot in plots:
            parts += [f"![{plot.title}]({plot.path.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(parts).rstrip() + "\n"


def _img(plot: Plot) -> str:
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    title = html.escape(plot.title)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{title}">'
            f"<figcaption>{title}</figcaption></figure>")


def render_html(runs: Sequence[Run], table: ReportTable, plots: Sequence[Plot], layout: str = "columns") -> str:
    """A standalone page: inline CSS, plots embedded as data URIs, no external assets."""
    e = html.escape
    body = [f"<h1>{e(TITLE)}</h1>", '<ul class="runs">']
    body += [f"<li>{e(line)}</li>" for line in _run_lines(runs, table)]
    body += ["</ul>", to_html(table, layout), '<ul class="notes">']
    body += [f"<li>{e(note).replace('`', '')}</li>" for note in table.notes()]
    body.append("</ul>")
    if plots:
        body += ["<h2>Plots</h2>", *(_img(p) for p in plots)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(TITLE)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(
    run_dirs: Sequence[Path | str],
    out_dir: Path | str = "report",
    formats: Sequence[str] = ("md", "html"),
    metrics: Sequence[str] | None = None,
    layout: str = "columns",
) -> ReportFiles:
    """Read ``run_dirs`` and write the comparison report and its plots into ``out_dir``."""
    check_layout(layout)
    unknown = [f for f in formats if f not in ("md", "html")]
    if unknown or not formats:
        raise LmpatchError(f"Unknown report format {', '.join(unknown) or 'none'}; choose md, html or both.")
    runs = load_runs(run_dirs)
    table = build_table(runs, metrics)  # before any file is written: a typo in metrics fails cleanly
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LmpatchError(f"{out} is a file; pass a directory to --out for the report.")
    out.mkdir(parents=True, exist_ok=True)
    labels = [h.text for h in table.headers]
    plots = plot_curves(runs, labels, out, metrics)
    bars = plot_bars(runs, labels, out, metrics)
    if bars is not None:
        plots.insert(0, bars)
    md_path = html_path = None
    if "md" in formats:
        md_path = out / MARKDOWN_FILE
        atomic_write_text(md_path, render_markdown(runs, table, plots, out, layout))
    if "html" in formats:
        html_path = out / HTML_FILE
        atomic_write_text(html_path, render_html(runs, table, plots, layout))
    return ReportFiles(
        markdown=md_path,
        html=html_path,
        plots=tuple(plots),
        table_markdown=to_markdown(table, layout),
        legend=tuple(table.notes()),
    )
