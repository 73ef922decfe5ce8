"""SERAC's scope classifier: is this prompt about that stored edit?

SERAC (Mitchell et al. 2022) routes a prompt to its counterfactual model only when a
trained classifier says the prompt falls in the scope of a stored edit. The paper
fine-tunes a whole DistilBERT for it; here the encoder is frozen all-MiniLM-L6-v2 (the
offline retriever) and only a small head is trained on top of it:

    h(v) = normalise(W v + c)                  (384 -> head_dim; W starts as the identity)
    g(edit, prompt) = sigmoid(s * h(e) . h(x) + b)

so a memory of many edits is searched with one inner product, and the head - not the
encoder - learns what "same fact" means for CounterFact: a paraphrase of the edited
prompt is in scope, a neighbourhood probe (same relation and object, another subject)
is not, although raw MiniLM finds both similar.

Training pairs come from the first :data:`~lmpatch.methods.negatives.NEGATIVE_RECORDS`
records of ``counterfact-train`` with every :func:`~lmpatch.methods.negatives.held_out`
prompt removed: the edit statement ("prompt target_new") with its prompt and paraphrases
(positives), with its neighbourhood probes (hard negatives) and with other records'
prompts (random negatives). Validation uses the tuning records (5000+), as a memory of
``validate_records`` edits searched by every prompt, paraphrase and probe of them.

The trained head is cached per base model, embedder and settings
(``cache_dir()/serac/<key>/``). It does not depend on the base model's weights; the
fingerprint is part of the key so that each model keeps its own, as a trained editor
is documented to be.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lmpatch.fileio import atomic_path, atomic_write_json
from lmpatch.memory.embedder import embedder_for
from lmpatch.memory.fact_memory import statement
from lmpatch.memory.pools import pool_embeddings
from lmpatch.model.loading import cache_dir

log = logging.getLogger(__name__)

__all__ = ["ScopeConfig", "ScopeHead", "load_scope_head", "scope_dir", "train_scope_head"]

HEAD_ROLES = ("head.weight", "head.bias", "head.scale", "head.offset")


@dataclass(frozen=True)
class ScopeConfig:
    """How the head is trained (all of it keys the cached artefact).

    Chosen on the validation memory (200 tuning edits): a 384 -> 256 tanh head trained
    at lr 3e-3 overfit (probes in scope 0.195); starting from the identity at lr 3e-4
    gives prompts 1.0, paraphrases 0.94, probes 0.035 in scope, where raw MiniLM cosine
    at its best threshold trades paraphrases 0.825 for probes 0.045.
    """

    embedder: str = "minilm"
    data: str = "counterfact-train"
    records: int = 5000
    head_dim: int = 384
    hard_negatives: int = 3
    random_negatives: int = 3
    epochs: int = 30
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 512
    seed: int = 0
    validate_records: int = 200


class ScopeHead(nn.Module):
    """The trained projection and the calibration of its cosine into a probability."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, head_dim)
        if head_dim == dim:  # start from MiniLM's own cosine and learn a correction
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim))
                self.proj.bias.zero_()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.offset = nn.Parameter(torch.tensor(-12.0))

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(vectors), dim=-1)

    def logits(self, edits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Pairwise logits of projected rows (``edits[i]`` with ``prompts[i]``)."""
        return self.scale * (edits * prompts).sum(-1) + self.offset

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "head.weight": self.proj.weight.detach().clone(), "head.bias": self.proj.bias.detach().clone(),
            "head.scale": self.scale.detach().reshape(1).clone(), "head.offset": self.offset.detach().reshape(1).clone(),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "ScopeHead":
        weight = state["head.weight"]
        head = cls(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            head.proj.weight.copy_(weight)
            head.proj.bias.copy_(state["head.bias"])
            head.scale.copy_(state["head.scale"].reshape(()))
            head.offset.copy_(state["head.offset"].reshape(()))
        return head.eval().requires_grad_(False)


def head_id(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a head's tensors: memories with different heads are never grouped."""
    h = hashlib.sha256()
    for role in HEAD_ROLES:
        h.update(role.encode())
        h.update(state[role].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def scope_dir(fingerprint: str, config: ScopeConfig) -> Path:
    embedder = embedder_for(config.embedder)
    key = hashlib.sha256(json.dumps({"fingerprint": fingerprint, "embedder": embedder.id, **asdict(config)},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "serac" / key


# --------------------------------------------------------------------------- data


def _pairs(records: list, config: ScopeConfig, skip: frozenset[str]) -> tuple[list[str], list[str], list[float]]:
    """(edit statements, prompts, labels) for the records, deterministic in ``config.seed``."""
    g = torch.Generator().manual_seed(config.seed)
    prompts = [r.prompt for r in records if r.prompt.strip() not in skip]
    edits, queries, labels = [], [], []
    for r in records:
        if r.prompt.strip() in skip:
            continue
        e = statement(r)
        positives = [r.prompt, *(p for p in r.rephrase if p.strip() not in skip)]
        hard = [p.prompt for p in r.locality if p.kind == "neighborhood" and p.prompt.strip() not in skip]
        picks = torch.randint(len(prompts), (config.random_negatives,), generator=g).tolist()
        randoms = [prompts[i] for i in picks if prompts[i] != r.prompt]
        for x, y in [*((p, 1.0) for p in positives), *((h, 0.0) for h in hard[: config.hard_negatives]),
                     *((q, 0.0) for q in randoms)]:
            edits.append(e)
            queries.append(x)
            labels.append(y)
    return edits, queries, labels


def _embed(texts: list[str], config: ScopeConfig, name: str, show: bool) -> tuple[torch.Tensor, list[int]]:
    """Embeddings of the distinct texts (one cached pool) and each text's row."""
    distinct = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(distinct)}
    vectors = pool_embeddings(embedder_for(config.embedder), distinct, name, progress=show)
    return vectors, [where[t] for t in texts]


# --------------------------------------------------------------------------- training


def train_scope_head(fingerprint: str, config: ScopeConfig, show: bool = False) -> tuple[ScopeHead, dict]:
    """Train the head, validate it on the tuning records and cache both; returns (head, report)."""
    from lmpatch.data import load_dataset
    from lmpatch.methods.negatives import NEGATIVE_RECORDS, held_out

    if config.data != "counterfact-train":
        raise ValueError("SERAC's scope classifier trains on counterfact-train (the split kept for training).")
    if not 0 < config.records <= NEGATIVE_RECORDS:
        raise ValueError(f"SERAC may train on at most the first {NEGATIVE_RECORDS} records (the rest are for tuning).")
    t0 = time.perf_counter()
    skip = held_out()
    records = load_dataset(config.data, n=config.records)
    edits, queries, labels = _pairs(records, config, skip)
    vectors, rows = _embed(edits + queries, config, "serac-scope-training", show)
    n = len(edits)
    e_rows, q_rows = torch.tensor(rows[:n]), torch.tensor(rows[n:])
    y = torch.tensor(labels)
    embed_seconds = time.perf_counter() - t0

    torch.manual_seed(config.seed)
    head = ScopeHead(vectors.shape[1], config.head_dim)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=g)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            logits = head.logits(head.project(vectors[e_rows[idx]]), head.project(vectors[q_rows[idx]]))
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
    head.eval().requires_grad_(False)
    report = {
        "pairs": n, "positives": int(y.sum()), "embed_seconds": round(embed_seconds, 1),
        "train_seconds": round(time.perf_counter() - t0 - embed_seconds, 1), "final_loss": round(losses[-1], 4) if losses else None,
        "validation": validate(head, config, show),
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _save(scope_dir(fingerprint, config), head, config, report)
    return head, report


def validate(head: ScopeHead, config: ScopeConfig, show: bool = False, threshold: float = 0.5) -> dict:
    """A memory of ``validate_records`` tuning edits, searched by each of their prompts,
    paraphrases and neighbourhood probes: how often the right edit is found in scope, and
    how often a probe is (wrongly) found in scope of any edit."""
    from lmpatch.data import load_dataset
    from lmpatch.methods.negatives import NEGATIVE_RECORDS

    records = load_dataset(config.data, n=config.validate_records, offset=NEGATIVE_RECORDS)
    facts = [statement(r) for r in records]
    asked = [(i, "prompt", r.prompt) for i, r in enumerate(records)]
    asked += [(i, "paraphrase", p) for i, r in enumerate(records) for p in r.rephrase]
    asked += [(i, "probe", p.prompt) for i, r in enumerate(records) for p in r.locality if p.kind == "neighborhood"]
    vectors, rows = _embed(facts + [t for _, _, t in asked], config, "serac-scope-validation", show)
    keys = head.project(vectors[torch.tensor(rows[: len(facts)])])
    qs = head.project(vectors[torch.tensor(rows[len(facts):])])
    with torch.no_grad():
        probs = torch.sigmoid(head.scale * (qs @ keys.T) + head.offset)
    best, which = probs.max(dim=1)
    out: dict[str, float] = {}
    for kind in ("prompt", "paraphrase", "probe"):
        sel = [j for j, (_, k, _) in enumerate(asked) if k == kind]
        hit = [bool(best[j] >= threshold) and (kind == "probe" or int(which[j]) == asked[j][0]) for j in sel]
        out[{"prompt": "prompt_in_scope", "paraphrase": "paraphrase_in_scope", "probe": "probe_in_scope"}[kind]] = (
            round(sum(hit) / max(len(hit), 1), 4))
    out["memory_size"] = len(facts)
    return out


def _save(folder: Path, head: ScopeHead, config: ScopeConfig, report: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "scope.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in head.state().items()}, str(tmp))
    atomic_write_json(folder / "manifest.json", {"config": asdict(config), "report": report})


def load_scope_head(fingerprint: str, config: ScopeConfig) -> tuple[ScopeHead, dict] | None:
    """The cached head and its training report, or None when not trained yet."""
    from safetensors.torch import load_file

    folder = scope_dir(fingerprint, config)
    try:
        state = load_file(str(folder / "scope.safetensors"))
        report = json.loads((folder / "manifest.json").read_text())["report"]
        return ScopeHead.from_state(state), report
    except (OSError, ValueError, KeyError) as exc:
        if (folder / "scope.safetensors").exists():
            log.warning("Ignoring unreadable SERAC scope classifier in %s (%s); training again", folder, exc)
        return None
