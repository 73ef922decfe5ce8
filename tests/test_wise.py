"""WISE's side memories: the TIES merge, how shards group into memories, and the router's
choice among them. The life cycle (edit, apply, revert, save, load) is in test_conformance."""
from __future__ import annotations

import pytest
import torch

import lmpatch
from facts import REQS
from lmpatch.methods.wise import WiseMemory, shard_mask, ties_merge
from lmpatch.patch import ModuleAddition
from tiny import tiny_model

SHAPE = (4, 6)


def _settings(save_freq: int, merge_freq: int, **kw) -> dict:
    return {"shape": list(SHAPE), "act": "silu", "seed": 3, "mask_ratio": 0.5, "act_ratio": 0.5,
            "save_freq": save_freq, "merge_freq": merge_freq, "merge_density": 1.0, **kw}


def _member(settings: dict, shard: int, value: float, edit_act: float) -> ModuleAddition:
    n = shard_mask(settings["seed"], shard, SHAPE, settings["mask_ratio"]).numel()
    return ModuleAddition(place="h", type=WiseMemory.type_name,
                          config={**settings, "shard": shard, "edit_act": edit_act},
                          state={"values": torch.full((n,), value)})


def test_ties_merge_trims_elects_a_sign_and_averages_the_agreeing_entries():
    a = torch.tensor([[1.0, -2.0, 0.1, 4.0]])
    b = torch.tensor([[3.0, 1.5, -0.2, -1.0]])
    # density 0.5 keeps each one's two largest entries: a -> [0, -2, 0, 4], b -> [3, 1.5, 0, 0]
    merged = ties_merge([a, b], density=0.5)
    # signs by the trimmed sums: [+, -, 0, +]; entry 3 averages only the agreeing 4
    assert torch.equal(merged, torch.tensor([[3.0, -2.0, 0.0, 4.0]]))
    assert torch.equal(ties_merge([a, a], density=1.0), a)


@pytest.mark.parametrize(("save_freq", "merge_freq", "memories"), [(1, 1, 3), (1, 2, 2), (2, 2, 2)])
def test_shards_group_into_memories_each_with_its_own_threshold(save_freq, merge_freq, memories):
    settings = _settings(save_freq, merge_freq)
    # shard of each of four edits, as apply_wise numbers them: edit i goes to shard i // save_freq
    members = [_member(settings, i // save_freq, 0.1 * (i + 1), 10.0 * (i + 1)) for i in range(4)]
    if save_freq == 1:  # three shards, the third not yet finished
        members = members[:3]
    module = WiseMemory.combine(members)
    out = module.memories()
    assert len(out) == memories
    thresholds = [t for _, t in out]
    if (save_freq, merge_freq) == (1, 1):  # never merged: each shard answers with its own threshold
        assert thresholds == pytest.approx([5.0, 10.0, 15.0])
    if (save_freq, merge_freq) == (1, 2):  # shards 0 and 1 merged, the smallest act of the two sets it
        assert thresholds == pytest.approx([5.0, 15.0])
        both = module.shard_delta(0) + module.shard_delta(1)
        overlap = (module.shard_delta(0) != 0) & (module.shard_delta(1) != 0)
        assert overlap.any() and torch.allclose(out[0][0][overlap], both[overlap] / 2)
    if (save_freq, merge_freq) == (2, 2):  # two shards of two edits: each shard's deltas sum
        assert thresholds == pytest.approx([5.0, 15.0])
        idx = shard_mask(3, 0, SHAPE, 0.5)
        assert torch.allclose(module.shard_delta(0).flatten()[idx], torch.full((idx.numel(),), 0.3))


def test_the_router_answers_with_the_memory_whose_change_is_largest_above_its_threshold():
    settings = _settings(1, 1, act="relu", mask_ratio=1.0, act_ratio=1.0)
    weak, strong = _member(settings, 0, 0.01, 0.0), _member(settings, 1, 0.02, 0.0)
    module = WiseMemory.combine([weak, strong])
    host = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    torch.nn.init.zeros_(host.weight)
    x = torch.ones(1, 2, SHAPE[1])
    base = host(x)
    out = module.hook(host, (x,), {}, base)
    assert torch.allclose(out, base + 0.02 * SHAPE[1])  # the larger change answers
    module = WiseMemory.combine([_member({**settings, "act_ratio": 1e9}, 0, 0.01, 1.0)])
    assert torch.equal(module.hook(host, (x,), {}, base), base)  # below every threshold: the base answers


def test_a_new_shard_starts_every_save_freq_edits():
    model = tiny_model("llama")
    fast = dict(steps=2, irrelevant=2, swapped=1, related=0, pool=8, replay=2, save_freq=2, merge_freq=2)
    shards = []
    for r in REQS[:3]:
        patch = lmpatch.edit(model, r, "wise", **fast)
        patch.apply(model)
        shards.append(patch.metrics["edit"]["shard"])
    assert shards == [0, 0, 1]
    module = next(i.module for i in model.stack.additions() if isinstance(i.module, WiseMemory))
    assert len(module.memories()) == 2
