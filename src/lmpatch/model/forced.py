"""Teacher-forced inputs: how a prompt and its target are fed, and where the target is read.

Everything that scores or trains on a target (the metrics, FT, the learned editors, the
memory editors' training) builds its batch here, so decoder-only and encoder-decoder
models differ in this one place:

* decoder-only: prompt and target IDs are one sequence; target token j is predicted at
  position ``len(prompt) - 1 + j`` (shifted by the padding on the left, if any);
* encoder-decoder (T5): the encoder reads the prompt, the decoder reads its start token
  followed by the target; target token j is predicted at decoder position j. The target is
  tokenised on its own, as T5's labels are (:func:`pair_ids`).

With ``prompt_only`` the target is not fed: every target token is read where the first
one is (FT-L's bag-of-tokens objective).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmpatch.errors import InvalidRequestError
from lmpatch.tokens import PromptTarget, encode, pad_left, pad_right, prompt_target

PADDING_SIDES = ("right", "left")


def pad_id(model) -> int:
    tok = model.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def pair_ids(model, prompt_text: str, target: str) -> PromptTarget:
    """The IDs of an already formatted prompt and of its target, as the model reads them
    (:func:`compute_pair_ids`, remembered per model: :attr:`LoadedModel.pair_ids`)."""
    return model.pair_ids(prompt_text, target)


def compute_pair_ids(model, prompt_text: str, target: str) -> PromptTarget:
    """The IDs of an already formatted prompt and of its target, as the model reads them.

    Decoder-only: the ID-level join of :func:`lmpatch.tokens.prompt_target`. Encoder-decoder:
    the prompt with the tokenizer's special tokens (T5 ends its inputs with ``</s>``) and the
    target alone, without special tokens or a leading space - it starts the decoder's text.
    """
    if not model.spec.encoder_decoder:
        return prompt_target(model.tokenizer, prompt_text, target)
    ids = encode(model.tokenizer, target.strip(), special=False)
    if not ids:
        raise InvalidRequestError(f"Target {target!r} tokenises to nothing.")
    return PromptTarget(tuple(encode(model.tokenizer, prompt_text)), tuple(ids))


@dataclass(frozen=True)
class ForcedInputs:
    """A padded batch and, per item, the output position that predicts its first target token.

    Output positions index the decoder's output for an encoder-decoder and the sequence
    otherwise; fed targets continue at ``first[i] + j``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    first: list[int]
    position_ids: torch.Tensor | None = None
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None

    def kwargs(self, device: torch.device | str) -> dict[str, torch.Tensor | bool]:
        """Keyword arguments of :meth:`lmpatch.model.loading.LoadedModel.forward`, on ``device``."""
        out: dict[str, torch.Tensor | bool] = {
            "input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device), "use_cache": False,
        }
        for key in ("position_ids", "decoder_input_ids", "decoder_attention_mask"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to(device)
        return out


def forced_inputs(
    model, items: Sequence[PromptTarget], padding_side: str = "right", prompt_only: bool = False,
) -> ForcedInputs:
    """The batch that feeds ``items`` (see the module doc); left padding gets position IDs
    counted over real tokens so that padding moves nothing."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    pad = pad_right if padding_side == "right" else pad_left
    if model.spec.encoder_decoder:
        ids, mask = pad([it.prompt_ids for it in items], pad_id(model))
        start = model.spec.decoder_start_id if model.spec.decoder_start_id is not None else pad_id(model)
        fed = [(start,) + (() if prompt_only else it.target_ids[:-1]) for it in items]
        dec_ids, dec_mask = pad_right(fed, pad_id(model))
        return ForcedInputs(ids, mask, [0] * len(items), decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask)
    seqs = [it.prompt_ids if prompt_only else it.ids for it in items]
    ids, mask = pad(seqs, pad_id(model))
    width = ids.shape[1]
    first = [
        (0 if padding_side == "right" else width - len(seq)) + len(it.prompt_ids) - 1
        for seq, it in zip(seqs, items)
    ]
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if padding_side == "left" else None
    return ForcedInputs(ids, mask, first, position_ids=positions)
