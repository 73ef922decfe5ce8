"""Text corpora that key statistics are estimated from, as a stream of documents.

A corpus is named by a short string so that it can sit in a cache key and on a command
line: the shipped ``"wikitext-2-raw"``, a path to a plain-text (or gzipped) file, or
``"hf:NAME[:CONFIG][:SPLIT]"`` for a Hugging Face dataset. Every corpus carries a ``key``
that changes whenever the text it yields would change (a content hash for files, a
format version for the shipped text), so cached statistics can never silently come
from a different corpus than the one asked for.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lmpatch.errors import LmpatchError

DEFAULT_CORPUS = "wikitext-2-raw"

# Bump when the way the shipped text is split or cleaned changes: the statistics change.
_WIKITEXT_FORMAT = 1
_WIKITEXT_FILE = ("files", "wikitext-2-raw", "wiki.test.raw.gz")

_TOP_HEADING = re.compile(r"^\s*=\s+([^=].*?)\s+=\s*$")
_ANY_HEADING = re.compile(r"^\s*(=\s+)+(.*?)(\s+=)+\s*$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: where its text lives and the key that identifies that text."""

    name: str
    kind: str  # "wikitext" (shipped), "file" or "hf"
    key: str
    path: Path | None = None
    hf_args: tuple[str, str | None, str] | None = None

    def documents(self) -> Iterator[str]:
        """Documents in corpus order; never empty strings."""
        if self.kind == "wikitext":
            return (detokenize_wikitext(d) for d in split_documents(_read_lines(self.path)))
        if self.kind == "file":
            return split_documents(_read_lines(self.path))
        return split_documents(_hf_lines(*self.hf_args))


def open_corpus(name: str | Path = DEFAULT_CORPUS) -> Corpus:
    """Resolve a corpus name to a :class:`Corpus`, failing early with a message that says what to pass."""
    text = str(name).strip()
    if text in (DEFAULT_CORPUS, "wikitext", "wikitext-2"):
        path = _shipped_wikitext()
        return Corpus(DEFAULT_CORPUS, "wikitext", f"wikitext-2-raw-{_content_hash(path)}-f{_WIKITEXT_FORMAT}", path)
    if text.startswith("hf:"):
        args = _parse_hf(text)
        slug = _SAFE.sub("_", "-".join(a for a in args if a))
        return Corpus(text, "hf", f"hf-{slug}", hf_args=args)
    path = Path(text).expanduser()
    if not path.is_file():
        raise LmpatchError(
            f"Unknown corpus '{text}': pass '{DEFAULT_CORPUS}', the path of an existing text file "
            "(.txt or .gz), or 'hf:NAME[:CONFIG][:SPLIT]' for a Hugging Face dataset."
        )
    stem = path.name.removesuffix(".gz")
    return Corpus(str(path), "file", f"file-{_SAFE.sub('_', stem)[:40]}-{_content_hash(path)}", path)


def split_documents(lines: Iterable[str]) -> Iterator[str]:
    """Group lines into documents: a blank line or a top-level ``= Title =`` heading starts a new one.

    The shipped WikiText split has no blank lines, so its documents are whole articles;
    ordinary text files split into paragraphs. Empty lines never reach the model.
    """
    doc: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            if doc:
                yield "\n".join(doc)
                doc = []
            continue
        if _TOP_HEADING.match(line) and doc:
            yield "\n".join(doc)
            doc = []
        doc.append(line)
    if doc:
        yield "\n".join(doc)


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenised spacing (`` @-@ ``, `` , ``, ``= Heading =``) so keys see natural text.

    The statistics are meant to describe the keys the model meets on ordinary prose;
    WikiText's space-separated punctuation is a distribution shift we can cheaply remove.
    """
    lines = []
    for line in text.split("\n"):
        m = _ANY_HEADING.match(line)
        line = m.group(2) if m else line.strip()
        line = re.sub(r" @(.)@ ", r"\1", line)
        line = re.sub(r" ([.,;:!?)\]}'%])", r"\1", line)
        line = re.sub(r"([(\[{$]) ", r"\1", line)
        line = re.sub(r" n't\b", "n't", line)
        line = re.sub(r" '(s|re|ve|ll|d|m)\b", r"'\1", line)
        lines.append(line)
    return "\n".join(lines)


def _read_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            yield from fh
    except (OSError, EOFError) as exc:
        raise LmpatchError(f"Could not read corpus file '{path}': {exc}") from exc


def _content_hash(path: Path) -> str:
    """Short hash of the (decompressed) text, so re-compressing a file keeps its key."""
    h = hashlib.sha256()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except (OSError, EOFError) as exc:
        raise LmpatchError(f"Could not read corpus file '{path}': {exc}") from exc
    return h.hexdigest()[:10]


def _shipped_wikitext() -> Path:
    res = importlib.resources.files("lmpatch.data").joinpath(*_WIKITEXT_FILE)
    path = Path(str(res))
    if not path.is_file():
        raise LmpatchError(
            f"The shipped corpus file {'/'.join(_WIKITEXT_FILE)} is missing from the lmpatch "
            "package; reinstall lmpatch or pass the path of a text file as the corpus."
        )
    return path


def _parse_hf(text: str) -> tuple[str, str | None, str]:
    parts = text[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise LmpatchError(f"Bad corpus '{text}': write it as 'hf:NAME', 'hf:NAME:CONFIG' or 'hf:NAME:CONFIG:SPLIT'.")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _hf_lines(name: str, config: str | None, split: str) -> Iterator[str]:
    """Rows of a Hugging Face dataset as lines; a multi-line row is a document of its own."""
    try:
        import datasets
    except ImportError as exc:
        raise LmpatchError(
            "Corpus 'hf:...' needs the `datasets` package: `pip install datasets`, "
            f"or save the text to a file and pass its path instead ({exc})."
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad split: all mean "not usable here"
        raise LmpatchError(
            f"Could not load Hugging Face dataset '{name}' (config {config}, split {split}): {exc}. "
            "Without internet, save the text to a file and pass its path as the corpus."
        ) from exc
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None
    )
    if column is None:
        raise LmpatchError(f"Hugging Face dataset '{name}' has no text column.")
    for row in ds:
        value = row[column] or ""
        if "\n" in value.strip():
            yield from value.splitlines()
            yield ""
        else:
            yield value
