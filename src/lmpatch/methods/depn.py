"""DEPN (Wu et al., EMNLP 2023): find the "privacy neurons" that recall private strings, switch them off.

For every private text (a request's prompt followed by the string to forget, its
``target_true``), each MLP neuron gets an integrated-gradients attribution for the
private tokens (:mod:`lmpatch.methods.neuron_attribution`; all of the string's tokens
at once). Then, as in the paper's aggregation:

* per text, the neurons whose attribution is at least ``threshold_ratio`` × that text's
  largest are its candidates;
* neurons that are candidates for at least ``mode_ratio_bag`` of the texts are kept
  (privacy neurons are shared by the records they memorise);
* the ``erase_kn_num`` kept neurons with the largest total attribution are erased: their
  output vectors (columns of the MLP output matrix) are set to zero, which is what
  zeroing the neuron's activation does.

The paper works on BERT (masked LM); here the private tokens are read as the causal
model predicts them after the context. With ``max_texts`` only a seeded sample of the
requests is attributed (the paper samples 20-200 private texts), and the neurons found
are erased for all. The change is a few columns of a few matrices, stored low-rank like
KN's, so it saves, applies and reverts like any patch.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lmpatch.errors import InvalidRequestError
from lmpatch.methods.kn import erase_columns
from lmpatch.methods.neuron_attribution import neuron_attributions
from lmpatch.methods.registry import Method, register
from lmpatch.model.forced import pair_ids
from lmpatch.model.loading import LoadedModel
from lmpatch.patch import Patch
from lmpatch.progress import progress_bar
from lmpatch.request import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DEPNHparams:
    """The paper's settings: 20 integration steps, threshold × mode ratio ≈ 0.005 (its
    README's advice: 0.01 × 0.5), and 10-200 neurons for phone numbers and names."""

    steps: int = 20
    threshold_ratio: float = 0.01
    mode_ratio_bag: float = 0.5
    erase_kn_num: int = 100
    layers: tuple[int, ...] | None = None   # None: every layer
    max_texts: int | None = None            # attribute a seeded sample of this many requests
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.erase_kn_num < 1:
            raise InvalidRequestError("DEPN steps and erase_kn_num must be positive.")
        if not 0.0 < self.threshold_ratio <= 1.0 or not 0.0 < self.mode_ratio_bag <= 1.0:
            raise InvalidRequestError("DEPN threshold_ratio and mode_ratio_bag must be in (0, 1].")
        if self.max_texts is not None and self.max_texts < 1:
            raise InvalidRequestError(f"DEPN max_texts must be positive or None, got {self.max_texts}.")


def privacy_neurons(model: LoadedModel, requests: Sequence[EditRequest], hp: DEPNHparams,
                    show: bool = False) -> tuple[list[tuple[int, int]], dict]:
    """The (layer, neuron) pairs to erase, strongest first, and what the search saw."""
    spec = model.spec
    layers = sorted({spec.check_layer(x) for x in hp.layers}) if hp.layers is not None else list(range(spec.n_layers))
    texts = list(requests)
    if hp.max_texts is not None and len(texts) > hp.max_texts:
        texts = random.Random(hp.seed).sample(texts, hp.max_texts)
    votes: Counter[tuple[int, int]] = Counter()
    total = torch.zeros(len(layers), spec.mlp_size)
    with progress_bar(show, "privacy neurons", len(texts), "texts") as advance:
        for r in texts:
            pt = pair_ids(model, model.format_prompt(r.prompt), r.target_true)
            ids = list(pt.ids)
            first = len(pt.prompt_ids) - 1
            positions = list(range(first, first + len(pt.target_ids)))
            attr = neuron_attributions(model, ids, positions, pt.target_ids, layers, hp.steps)
            top = float(attr.max())
            if top > 0:
                rows, cols = torch.nonzero(attr >= hp.threshold_ratio * top, as_tuple=True)
                votes.update(zip(rows.tolist(), cols.tolist()))
            total += attr
            advance(1)
    need = hp.mode_ratio_bag * len(texts)
    kept = [key for key, n in votes.items() if n >= need]
    kept.sort(key=lambda key: float(total[key]), reverse=True)
    chosen = [(layers[row], col) for row, col in kept[: hp.erase_kn_num]]
    info = {"texts": len(texts), "candidates": len(votes), "shared": len(kept), "erased": len(chosen),
            "layers": dict(sorted(Counter(layer for layer, _ in chosen).items()))}
    return chosen, info


def apply_depn(model: LoadedModel, requests: Sequence[EditRequest], hp: DEPNHparams) -> Patch:
    """Erase the privacy neurons of ``requests`` (each request's ``target_true`` is the private string)."""
    hp.check()
    requests = list(requests)
    missing = [r.prompt for r in requests if not r.target_true]
    if missing:
        raise InvalidRequestError(
            f"DEPN forgets each request's target_true (the private string after the prompt); {missing[0]!r} has none."
        )
    chosen, info = privacy_neurons(model, requests, hp, show=len(requests) > 1)
    if not chosen:
        raise InvalidRequestError(
            "DEPN found no neuron shared by enough of the texts; lower mode_ratio_bag or threshold_ratio."
        )
    return Patch(parts=erase_columns(model, chosen), method="depn", model_fingerprint=model.fingerprint,
                 model_name=model.name, hparams=asdict(hp), requests=requests, metrics={"edit": info})


register(Method(
    name="depn", summary="DEPN: privacy neurons found by integrated gradients over the private tokens, switched off",
    hparams=DEPNHparams, edit=apply_depn,
    paper="Wu et al., DEPN: Detecting and Editing Privacy Neurons in Pretrained Language Models, EMNLP 2023",
))
