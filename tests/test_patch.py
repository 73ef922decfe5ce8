"""Patches: apply/revert bit-exactness, stacking rules, composition, the file format and merging."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

import lmpatch
from lmpatch.errors import PatchError
from lmpatch.patch import (
    MERGE_MANIFEST,
    AddedModule,
    ModuleAddition,
    Patch,
    StackEntry,
    WeightDelta,
    compose,
    register_addition,
)
from lmpatch.request import EditRequest, Probe

VOCAB = 100


# --------------------------------------------------------------------------- fixtures


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab["<unk>"] = VOCAB - 2
    vocab["<eos>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> lmpatch.LoadedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    return lmpatch.wrap_model(model, _tokenizer(), name="tiny-llama")


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> lmpatch.LoadedModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    return lmpatch.wrap_model(model, _tokenizer(), name="tiny-gpt2")


BUILDERS = {
    "llama-f32": lambda: tiny_llama(torch.float32),
    "llama-bf16": lambda: tiny_llama(torch.bfloat16),
    "gpt2-f32": lambda: tiny_gpt2(torch.float32),
    "gpt2-bf16": lambda: tiny_gpt2(torch.bfloat16),
}


@pytest.fixture(params=sorted(BUILDERS))
def lm(request) -> lmpatch.LoadedModel:
    return BUILDERS[request.param]()


@pytest.fixture
def llama() -> lmpatch.LoadedModel:
    return tiny_llama()


def snapshot(lm: lmpatch.LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def assert_weights_equal(lm: lmpatch.LoadedModel, snap: dict[str, torch.Tensor]) -> None:
    params = dict(lm.model.named_parameters())
    assert params.keys() == snap.keys()
    differing = [n for n, p in params.items() if not torch.equal(p, snap[n])]
    assert differing == [], f"parameters not restored bit-exactly: {differing}"


def make_delta(lm, param: str, kind: str, seed: int, rank: int = 2, scale: float = 0.5) -> WeightDelta:
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(lm.model.get_parameter(param).shape)
    if kind == "low_rank":
        rows, cols = shape
        return WeightDelta(
            param,
            left=torch.randn(rows, rank, generator=gen) * scale,
            right=torch.randn(rank, cols, generator=gen) * scale,
        )
    return WeightDelta(param, dense=torch.randn(shape, generator=gen) * scale)


def make_patch(lm, params_kinds: list[tuple[str, str]], seed: int = 1, method: str = "test", **kw) -> Patch:
    deltas = [make_delta(lm, p, k, seed + i) for i, (p, k) in enumerate(params_kinds)]
    return Patch(parts=deltas, method=method, model_fingerprint=lm.fingerprint, model_name=lm.name, **kw)


def mlp_out(lm, layer: int) -> str:
    return lm.spec.layers[layer].mlp_out + ".weight"


def a_vector_param(lm) -> str:
    """A 1-D parameter (norm weight / bias) so non-matrix deltas are covered too."""
    return next(n for n, p in lm.model.named_parameters() if p.dim() == 1)


def an_embedding(lm) -> str:
    return next(n for n, p in lm.model.named_parameters() if p.shape[0] == VOCAB)


def request(i: int = 0) -> EditRequest:
    return EditRequest(
        prompt=f"The Eiffel Tower {i} is in", subject=f"Eiffel Tower {i}", target_new="Rome",
        target_true="Paris", rephrase=["Where is it?"], locality=[Probe("Japan capital is", "Tokyo")],
    )


def logits(lm) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits.float()


# --------------------------------------------------------------------------- WeightDelta


def test_weight_delta_stores_private_float32_cpu_copy():
    dense = torch.ones(3, 4, dtype=torch.bfloat16)
    d = WeightDelta("w", dense=dense)
    dense.add_(5)  # caller keeps mutating its tensor
    assert d.dense.dtype == torch.float32 and d.dense.device.type == "cpu"
    assert torch.equal(d.dense, torch.ones(3, 4))
    assert not d.is_low_rank and d.rank is None and d.shape == (3, 4) and d.kind == "dense"


def test_low_rank_delta_materializes_product_in_parameter_layout():
    left, right = torch.randn(5, 2), torch.randn(2, 7)
    d = WeightDelta("w", left=left, right=right)
    assert d.is_low_rank and d.rank == 2 and d.shape == (5, 7) and d.stored_numel == 24
    full = d.materialize()
    assert torch.allclose(full, left @ right)
    assert d.materialize(torch.float64).dtype == torch.float64
    assert abs(d.norm() - float(torch.linalg.norm(left @ right))) < 1e-4
    full.add_(1)  # materialize hands out a fresh tensor
    assert torch.allclose(d.materialize(), left @ right)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"dense": torch.ones(2, 2), "left": torch.ones(2, 1), "right": torch.ones(1, 2)},
        {"left": torch.ones(2, 1)},
        {"left": torch.ones(2, 1), "right": torch.ones(2, 2)},
        {"dense": torch.tensor([1.0, float("nan")])},
        {"dense": [[1.0, 2.0]]},
    ],
    ids=["neither", "both", "one-factor", "factor-mismatch", "nan", "not-tensor"],
)
def test_weight_delta_rejects_malformed_input(kwargs):
    with pytest.raises(PatchError):
        WeightDelta("w", **kwargs)


def test_patch_rejects_two_deltas_for_one_param(llama):
    name = mlp_out(llama, 0)
    with pytest.raises(PatchError, match="two deltas"):
        make_patch(llama, [(name, "dense"), (name, "low_rank")])


# --------------------------------------------------------------------------- apply / revert


@pytest.mark.parametrize("kind", ["dense", "low_rank"])
def test_apply_then_revert_restores_every_parameter_bit_exactly(lm, kind):
    before = snapshot(lm)
    out_before = logits(lm)
    targets = [(mlp_out(lm, 0), kind), (mlp_out(lm, 1), kind), (a_vector_param(lm), "dense"), (an_embedding(lm), "dense")]
    patch = make_patch(lm, targets)

    patch.apply(lm)
    assert patch.is_applied(lm)
    params = dict(lm.model.named_parameters())
    for d in patch.deltas:
        w = params[d.param]
        expected = (before[d.param].float() + d.materialize()).to(w.dtype)
        assert torch.equal(w, expected), d.param
        assert not torch.equal(w, before[d.param])
    untouched = set(params) - {d.param for d in patch.deltas}
    assert untouched and all(torch.equal(params[n], before[n]) for n in untouched)
    assert not torch.equal(logits(lm), out_before)

    patch.revert(lm)
    assert_weights_equal(lm, before)
    assert torch.equal(logits(lm), out_before)
    assert lm.applied == [] and not patch.is_applied(lm)


def test_apply_writes_in_place_and_records_originals_on_the_model(llama):
    name = mlp_out(llama, 1)
    param = llama.model.get_parameter(name)
    storage = param.data_ptr()
    before = param.detach().clone()
    patch = make_patch(llama, [(name, "low_rank")])
    patch.apply(llama)
    assert llama.model.get_parameter(name) is param and param.data_ptr() == storage
    [record] = llama.applied
    assert isinstance(record, StackEntry) and record.patch_id == patch.patch_id
    assert set(record.deltas) == {name}
    assert llama.stack.saved_bytes() == before.numel() * before.element_size()  # the original, once
    patch.revert(llama)
    assert torch.equal(param, before)


def test_applied_context_reverts_even_when_body_raises(lm):
    before = snapshot(lm)
    patch = make_patch(lm, [(mlp_out(lm, 0), "low_rank")])
    with pytest.raises(RuntimeError, match="boom"):
        with patch.applied(lm):
            assert patch.is_applied(lm)
            raise RuntimeError("boom")
    assert not patch.is_applied(lm)
    assert_weights_equal(lm, before)
    with patch.applied(lm) as p:
        assert p is patch and patch.is_applied(lm)
    assert_weights_equal(lm, before)


def test_double_apply_is_refused(llama):
    patch = make_patch(llama, [(mlp_out(llama, 0), "dense")])
    patch.apply(llama)
    applied_weights = snapshot(llama)
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(llama)
    twin = make_patch(llama, [(mlp_out(llama, 0), "dense")])  # same content, another object
    assert twin.patch_id == patch.patch_id
    with pytest.raises(PatchError, match="already applied"):
        twin.apply(llama)
    assert_weights_equal(llama, applied_weights)
    assert len(llama.applied) == 1


def test_revert_of_a_patch_that_is_not_applied_is_refused(llama):
    patch = make_patch(llama, [(mlp_out(llama, 0), "dense")])
    with pytest.raises(PatchError, match="not applied"):
        patch.revert(llama)
    patch.apply(llama)
    patch.revert(llama)
    with pytest.raises(PatchError, match="not applied"):
        patch.revert(llama)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("removed", [0, 1, 2])
def test_any_overlapping_patch_reverts_to_base_plus_the_others_in_order(arch, removed):
    """Taking out any one of three patches (two share a weight with it) leaves the model
    bit-identical to a fresh base model with only the other two applied, in order."""
    lm = BUILDERS[arch]()
    before = snapshot(lm)
    shared = mlp_out(lm, 0)
    patches = [
        make_patch(lm, [(shared, "low_rank"), (mlp_out(lm, 1), "dense")], seed=1),
        make_patch(lm, [(shared, "dense")], seed=7),
        make_patch(lm, [(shared, "low_rank"), (a_vector_param(lm), "dense")], seed=11),
    ]
    for p in patches:
        p.apply(lm)
    patches[removed].revert(lm)
    assert [e.patch_id for e in lm.applied] == [p.patch_id for i, p in enumerate(patches) if i != removed]

    fresh = BUILDERS[arch]()
    for i, p in enumerate(patches):
        if i != removed:
            p.apply(fresh)
    assert_weights_equal(lm, snapshot(fresh))
    for p in [p for i, p in enumerate(patches) if i != removed][::-1]:
        p.revert(lm)
    assert_weights_equal(lm, before)
    assert lm.stack.saved_bytes() == 0


def test_stack_keeps_each_original_once_however_many_patches(llama):
    """Memory for undo grows with what is edited, not with how many patches edited it."""
    name = mlp_out(llama, 0)
    param = llama.model.get_parameter(name)
    one_copy = param.numel() * param.element_size()
    patches = [make_patch(llama, [(name, "low_rank")], seed=s) for s in range(20)]
    for p in patches:
        p.apply(llama)
    assert llama.stack.saved_bytes() <= 2 * one_copy  # the base value and the value before the top patch
    patches[-1].revert(llama)  # the top one: restored from the saved previous value
    patches[5].revert(llama)   # one in the middle: recomputed from the base
    fresh = tiny_llama()
    for i, p in enumerate(patches[:-1]):
        if i != 5:
            p.apply(fresh)
    assert_weights_equal(llama, snapshot(fresh))


def test_disjoint_patches_revert_in_any_order(lm):
    before = snapshot(lm)
    first = make_patch(lm, [(mlp_out(lm, 0), "low_rank")], seed=1)
    second = make_patch(lm, [(mlp_out(lm, 1), "low_rank")], seed=2)
    first.apply(lm)
    second.apply(lm)
    first.revert(lm)
    assert not first.is_applied(lm) and second.is_applied(lm)
    assert torch.equal(lm.model.get_parameter(mlp_out(lm, 0)), before[mlp_out(lm, 0)])
    second.revert(lm)
    assert_weights_equal(lm, before)


def test_wrong_fingerprint_is_refused_naming_both_models(llama):
    other = tiny_llama(seed=3)
    other.name = "other-llama"
    assert other.fingerprint != llama.fingerprint
    patch = make_patch(llama, [(mlp_out(llama, 0), "dense")])
    before = snapshot(other)
    with pytest.raises(PatchError, match="tiny-llama.*other-llama") as err:
        patch.apply(other)
    assert "\n" not in str(err.value)
    assert_weights_equal(other, before)
    assert other.applied == []


def test_missing_or_misshapen_parameter_is_refused_before_any_change(llama):
    before = snapshot(llama)
    good = make_delta(llama, mlp_out(llama, 0), "dense", 1)
    for bad, pattern in [
        (WeightDelta("model.layers.9.mlp.down_proj.weight", dense=torch.ones(64, 128)), "does not have"),
        (WeightDelta(mlp_out(llama, 1), dense=torch.ones(128, 64)), "shape"),
    ]:
        patch = Patch([good, bad], "test", llama.fingerprint, llama.name)
        with pytest.raises(PatchError, match=pattern):
            patch.apply(llama)
        assert_weights_equal(llama, before)
        assert llama.applied == []


def test_overflow_rolls_back_deltas_already_written():
    lm = tiny_llama(torch.float16)
    before = snapshot(lm)
    fine = make_delta(lm, mlp_out(lm, 0), "dense", 1)
    huge = WeightDelta(mlp_out(lm, 1), dense=torch.full((64, 128), 1e6))
    with pytest.raises(PatchError, match="overflow"):
        Patch([fine, huge], "test", lm.fingerprint, lm.name).apply(lm)
    assert_weights_equal(lm, before)
    assert lm.applied == []


def test_tied_weights_follow_the_patch_and_double_naming_is_refused():
    lm = tiny_gpt2()
    assert lm.model.get_parameter("lm_head.weight") is lm.model.get_parameter("transformer.wte.weight")
    before = snapshot(lm)
    patch = make_patch(lm, [("lm_head.weight", "low_rank")])
    other = make_patch(lm, [("transformer.wte.weight", "dense")], seed=5)
    patch.apply(lm)
    assert not torch.equal(lm.model.get_parameter("transformer.wte.weight"), before["transformer.wte.weight"])
    other.apply(lm)  # the same tensor under its other name: the stack knows they are one weight
    patch.revert(lm)
    fresh = tiny_gpt2()
    other.apply(fresh)
    assert_weights_equal(lm, snapshot(fresh))
    other.revert(lm)
    assert_weights_equal(lm, before)
    both = make_patch(lm, [("lm_head.weight", "dense"), ("transformer.wte.weight", "dense")])
    with pytest.raises(PatchError, match="tied"):
        both.apply(lm)
    assert_weights_equal(lm, before)


def test_apply_needs_an_lmpatch_model(llama):
    patch = make_patch(llama, [(mlp_out(llama, 0), "dense")])
    with pytest.raises(PatchError, match="wrap_model"):
        patch.apply(llama.model)


# --------------------------------------------------------------------------- identity


def test_patch_id_is_a_content_hash(llama):
    a = make_patch(llama, [(mlp_out(llama, 0), "low_rank")], hparams={"layers": (3,)}, requests=[request()])
    b = make_patch(llama, [(mlp_out(llama, 0), "low_rank")], hparams={"layers": [3]}, requests=[request()],
                   metrics={"efficacy": 1.0}, created_at="2000-01-01T00:00:00+00:00")
    assert a.patch_id == b.patch_id  # when it was made and how it scored do not change what it is
    assert make_patch(llama, [(mlp_out(llama, 0), "low_rank")], seed=2).patch_id != a.patch_id
    assert make_patch(llama, [(mlp_out(llama, 0), "low_rank")], method="rome").patch_id != a.patch_id
    assert make_patch(llama, [(mlp_out(llama, 0), "low_rank")], requests=[request(1)]).patch_id != a.patch_id
    a.deltas[0].left[0, 0] += 1.0
    assert a.patch_id != b.patch_id


def test_a_remembered_patch_id_follows_every_change(llama):
    """The id is remembered between calls (hashing a large patch's tensors is most of an
    apply); each change below must still give the id a freshly built patch would have."""
    def fresh(p: Patch) -> str:
        return Patch(parts=p.parts, method=p.method, model_fingerprint=p.model_fingerprint,
                     model_name=p.model_name, hparams=p.hparams, requests=list(p.requests)).patch_id

    a = make_patch(llama, [(mlp_out(llama, 0), "low_rank"), (mlp_out(llama, 1), "dense")], requests=[request()])
    first = a.patch_id
    assert a.patch_id == first == fresh(a)
    a.parts[1].dense = a.parts[1].dense.clone()  # new storage, same values: same patch
    assert a.patch_id == first
    a.parts[1].dense = a.parts[1].dense + 1.0
    assert a.patch_id == fresh(a) != first
    a.parts[0].right.mul_(2.0)
    assert a.patch_id == fresh(a)
    before = a.patch_id
    a.requests.append(request(1))
    assert a.patch_id == fresh(a) != before
    before = a.patch_id
    a.hparams["layers"] = [4]
    assert a.patch_id == fresh(a) != before
    before = a.patch_id
    a.parts.pop()
    assert a.patch_id == fresh(a) != before


def test_manifest_fields_are_json_normalised(llama):
    @dataclass
    class HP:
        layers: tuple = (1, 2)
        dtype: torch.dtype = torch.float32

    patch = make_patch(llama, [(mlp_out(llama, 0), "dense")], hparams=HP(), requests=[request().to_dict()])
    assert patch.hparams == {"layers": [1, 2], "dtype": "torch.float32"}
    assert patch.requests == [request()]
    assert patch.lmpatch_version == lmpatch.__version__
    summary = patch.summary()
    json.dumps(summary)  # JSON-able as promised
    assert summary["patch_id"] == patch.patch_id and summary["model_fingerprint"] == llama.fingerprint
    assert summary["deltas"][0]["param"] == mlp_out(llama, 0) and summary["deltas"][0]["kind"] == "dense"
    assert "tensor(" not in repr(patch)


# --------------------------------------------------------------------------- compose


def test_compose_equals_applying_both(lm):
    before = snapshot(lm)
    a = make_patch(lm, [(mlp_out(lm, 0), "low_rank"), (a_vector_param(lm), "dense")], seed=1, method="rome",
                   requests=[request(0)], hparams={"layer": 0})
    b = make_patch(lm, [(mlp_out(lm, 0), "low_rank"), (mlp_out(lm, 1), "dense")], seed=5, method="ft",
                   requests=[request(1)], hparams={"lr": 0.1})
    a.apply(lm)
    b.apply(lm)
    both = snapshot(lm)
    b.revert(lm)
    a.revert(lm)

    combined = compose([a, b])
    assert combined.method == "compose(rome+ft)"
    assert combined.requests == [request(0), request(1)]
    assert [p["hparams"] for p in combined.hparams["parts"]] == [{"layer": 0}, {"lr": 0.1}]
    assert [p["patch_id"] for p in combined.hparams["parts"]] == [a.patch_id, b.patch_id]
    by_param = {d.param: d for d in combined.deltas}
    assert len(by_param) == 3
    assert by_param[mlp_out(lm, 0)].is_low_rank and by_param[mlp_out(lm, 0)].rank == 4
    assert combined.compose().patch_id == compose([combined]).patch_id
    assert a.compose(b).patch_id == combined.patch_id

    with combined.applied(lm):
        for name, p in lm.model.named_parameters():
            tol = 1e-5 if p.dtype == torch.float32 else 2e-2
            assert torch.allclose(p.float(), both[name].float(), rtol=tol, atol=tol), name
    assert_weights_equal(lm, before)


def test_compose_mixed_kinds_and_large_ranks_become_dense(llama):
    name = mlp_out(llama, 0)  # 64 x 128: low-rank is smaller than dense only below rank 42
    low = make_patch(llama, [(name, "low_rank")], seed=1)
    dense = make_patch(llama, [(name, "dense")], seed=2)
    mixed = compose([low, dense]).deltas[0]
    assert not mixed.is_low_rank
    assert torch.allclose(mixed.materialize(), low.deltas[0].materialize() + dense.deltas[0].materialize())
    big = [Patch([make_delta(llama, name, "low_rank", s, rank=30)], "m", llama.fingerprint, llama.name) for s in (1, 2)]
    summed = compose(big).deltas[0]
    assert not summed.is_low_rank
    assert torch.allclose(summed.materialize(), big[0].deltas[0].materialize() + big[1].deltas[0].materialize(), atol=1e-4)


def test_compose_refuses_different_base_models_and_empty_input(llama):
    other = tiny_llama(seed=3)
    a = make_patch(llama, [(mlp_out(llama, 0), "dense")])
    b = make_patch(other, [(mlp_out(other, 0), "dense")])
    with pytest.raises(PatchError, match="different base models"):
        compose([a, b])
    with pytest.raises(PatchError, match="at least one"):
        compose([])
    with pytest.raises(PatchError, match="compose takes Patch objects .* got str"):
        compose([a, "a.lmpatch"])


def test_wrap_model_names_a_wrong_argument(llama):
    from lmpatch.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="takes a transformers model .* got str"):
        lmpatch.wrap_model("a", llama.tokenizer)
    with pytest.raises(ModelLoadError, match="tokenizer second, got NoneType"):
        lmpatch.wrap_model(llama.model, None)


# --------------------------------------------------------------------------- save / load


def assert_same_patch(a: Patch, b: Patch) -> None:
    assert b.patch_id == a.patch_id
    assert b.summary() == a.summary()
    assert b.requests == a.requests and b.metrics == a.metrics and b.created_at == a.created_at
    assert len(a.deltas) == len(b.deltas)
    for x, y in zip(a.deltas, b.deltas):
        assert x.param == y.param and x.kind == y.kind
        assert x.tensors().keys() == y.tensors().keys()
        assert all(torch.equal(x.tensors()[k], y.tensors()[k]) for k in x.tensors())


def test_save_load_round_trip(lm, tmp_path):
    patch = make_patch(
        lm, [(mlp_out(lm, 0), "low_rank"), (mlp_out(lm, 1), "dense"), (a_vector_param(lm), "dense")],
        hparams={"layers": [0, 1], "v_lr": 0.5}, requests=[request(0), request(1)],
        metrics={"efficacy": 0.75, "nested": {"a": [1, 2]}},
    )
    path = patch.save(tmp_path / "sub" / "edit.lmpatch")
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    loaded = Patch.load(path)
    assert_same_patch(patch, loaded)
    # The file really is safetensors with the manifest in its metadata.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["lmpatch"])
    assert manifest["format_version"] == 1 and manifest["method"] == "test"
    assert manifest["model_fingerprint"] == lm.fingerprint and len(manifest["deltas"]) == 3
    # And the loaded patch does to the model exactly what the original does.
    before = snapshot(lm)
    with patch.applied(lm):
        via_original = snapshot(lm)
    with loaded.applied(lm):
        assert_weights_equal(lm, via_original)
    assert_weights_equal(lm, before)


def test_fields_set_after_construction_round_trip(llama, tmp_path):
    patch = make_patch(llama, [(mlp_out(llama, 0), "low_rank")], requests=None)
    patch.hparams = {"layers": (1, 2), "dtype": torch.float32}  # as methods do after compose()
    patch.metrics = {"loss": torch.tensor(0.5)}
    loaded = Patch.load(patch.save(tmp_path / "late.lmpatch"))
    assert_same_patch(patch, loaded)
    assert loaded.hparams == {"layers": [1, 2], "dtype": "torch.float32"} and loaded.metrics == {"loss": 0.5}


def test_empty_patch_round_trips(llama, tmp_path):
    empty = Patch([], "noop", llama.fingerprint, llama.name)
    loaded = Patch.load(empty.save(tmp_path / "empty.lmpatch"))
    assert_same_patch(empty, loaded)
    before = snapshot(llama)
    with loaded.applied(llama):
        assert_weights_equal(llama, before)


def _saved(llama, tmp_path) -> tuple[Patch, bytes]:
    patch = make_patch(llama, [(mlp_out(llama, 0), "low_rank")], requests=[request()])
    path = patch.save(tmp_path / "good.lmpatch")
    return patch, path.read_bytes()


def _write_with_manifest(path, manifest) -> None:
    save_file({"x": torch.zeros(2)}, str(path), metadata={"lmpatch": manifest} if manifest is not None else None)


@pytest.mark.parametrize(
    "case",
    ["missing", "directory", "random-bytes", "empty", "truncated", "flipped-byte", "plain-safetensors",
     "bad-json", "future-version", "unknown-feature", "inconsistent"],
)
def test_load_rejects_bad_files_with_one_clear_error(llama, tmp_path, case):
    patch, good = _saved(llama, tmp_path)
    manifest = patch._manifest()
    path = tmp_path / "bad.lmpatch"
    if case == "directory":
        path.mkdir()
    elif case == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) - 100])
    elif case == "flipped-byte":
        data = bytearray(good)
        data[-5] ^= 0xFF  # inside the tensor data: only the content hash can notice
        path.write_bytes(bytes(data))
    elif case == "plain-safetensors":
        _write_with_manifest(path, None)
    elif case == "bad-json":
        _write_with_manifest(path, "{not json")
    elif case == "future-version":
        _write_with_manifest(path, json.dumps({**manifest, "format_version": 99}))
    elif case == "unknown-feature":
        _write_with_manifest(path, json.dumps({**manifest, "requires": ["weight_deltas", "grace_codebook"]}))
    elif case == "inconsistent":
        _write_with_manifest(path, json.dumps(manifest))  # manifest names tensors the file lacks
    with pytest.raises(PatchError) as err:
        Patch.load(path)
    message = str(err.value)
    assert "\n" not in message and "bad.lmpatch" in message
    if case == "future-version":
        assert "upgrade" in message


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("build", [lambda: tiny_llama(), lambda: tiny_gpt2(torch.bfloat16)], ids=["llama", "gpt2-bf16"])
def test_merge_writes_a_loadable_checkpoint_with_the_edited_weights(build, tmp_path):
    lm = build()
    before = snapshot(lm)
    patch = make_patch(lm, [(mlp_out(lm, 0), "low_rank"), (mlp_out(lm, 1), "dense")])
    with patch.applied(lm):
        edited = snapshot(lm)

    out = patch.merge(lm, tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert_weights_equal(lm, before)  # merge applied only for the save
    assert lm.applied == []
    record = json.loads((out / MERGE_MANIFEST).read_text())
    assert record["patch"]["patch_id"] == patch.patch_id and record["base_fingerprint"] == lm.fingerprint

    merged = lmpatch.load_model(out)
    merged_params = dict(merged.model.named_parameters())
    assert merged_params.keys() == edited.keys()
    for name, w in edited.items():
        assert torch.equal(merged_params[name], w.to(merged_params[name].dtype)), name


def test_merge_keeps_an_applied_patch_applied_and_refuses_occupied_dirs(llama, tmp_path):
    patch = make_patch(llama, [(mlp_out(llama, 0), "low_rank")])
    patch.apply(llama)
    edited = snapshot(llama)
    out = patch.merge(llama, tmp_path / "m")
    assert patch.is_applied(llama)
    assert_weights_equal(llama, edited)
    patch.merge(llama, out)  # an earlier merge may be overwritten
    occupied = tmp_path / "base"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    with pytest.raises(PatchError, match="not an empty directory"):
        patch.merge(llama, occupied)
    patch.revert(llama)


def test_a_failed_merge_leaves_nothing_that_blocks_the_retry(llama, tmp_path, monkeypatch):
    import errno

    patch = make_patch(llama, [(mlp_out(llama, 0), "low_rank")])

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(llama.tokenizer, "save_pretrained", full_disk)  # after the weights: half a checkpoint
        with pytest.raises(PatchError, match="No space left on device"):
            patch.merge(llama, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin
    assert (patch.merge(llama, tmp_path / "m") / "config.json").is_file()


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm():
    os.environ.setdefault("LMPATCH_CACHE", "/tmp/lmcache")
    return lmpatch.load_model()


@pytest.mark.model
def test_rank_one_patch_on_smollm2_is_exact_and_round_trips(smollm, tmp_path):
    lm = smollm
    name = lm.spec.layers[5].mlp_out + ".weight"
    assert tuple(lm.model.get_parameter(name).shape) == (576, 1536)
    gen = torch.Generator().manual_seed(0)
    delta = WeightDelta(name, left=torch.randn(576, 1, generator=gen) * 0.2, right=torch.randn(1, 1536, generator=gen) * 0.2)
    patch = Patch([delta], "test", lm.fingerprint, lm.name, requests=[request()])
    before = snapshot(lm)
    enc = lm.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        out_before = lm.model(**enc).logits
    loaded = Patch.load(patch.save(tmp_path / "p.lmpatch"))
    assert loaded.patch_id == patch.patch_id
    with loaded.applied(lm):
        with torch.no_grad():
            assert not torch.allclose(lm.model(**enc).logits, out_before)
        assert torch.equal(
            lm.model.get_parameter(name), before[name] + delta.materialize()
        )
    assert_weights_equal(lm, before)
    with torch.no_grad():
        assert torch.equal(lm.model(**enc).logits, out_before)


# --------------------------------------------------------------------------- older files


V1_FILE = Path(__file__).parent / "data" / "format-v1-weight-deltas.lmpatch"


def test_a_file_written_by_the_first_format_loads_with_the_same_id_and_manifest(tmp_path):
    """Written before patches had part kinds (rank-1 and dense deltas); it must keep its id."""
    from safetensors import safe_open

    patch = Patch.load(V1_FILE)
    assert patch.patch_id == "f0fdef38a4ce4d93"
    assert [d.kind for d in patch.deltas] == ["low_rank", "dense"] and patch.modules == []
    again = patch.save(tmp_path / "again.lmpatch")
    manifests = []
    for path in (V1_FILE, again):
        with safe_open(str(path), framework="pt") as f:
            manifests.append(json.loads(f.metadata()["lmpatch"]))
    assert manifests[0] == manifests[1]
    assert manifests[0]["requires"] == ["weight_deltas"]


# --------------------------------------------------------------------------- added modules


@register_addition
class _ShiftOutput(AddedModule):
    """Test-only addition: adds a fixed vector to its host's output."""

    type_name = "test.shift"

    def __init__(self, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("shift", shift.detach().float().clone())

    @classmethod
    def from_state(cls, config, state):
        return cls(state["shift"])

    def config(self):
        return {"what": "shift"}

    def hook(self, host, args, kwargs, output):
        return output + self.shift.to(output.dtype)


def shift_patch(lm, layer: int = 0, seed: int = 3, extra: list | None = None) -> Patch:
    width = lm.model.get_submodule(lm.spec.layers[layer].mlp_out).weight.shape
    out = width[1] if lm.spec.layers[layer].mlp_out.endswith("c_proj") else width[0]
    shift = torch.randn(out, generator=torch.Generator().manual_seed(seed))
    part = ModuleAddition.of(lm.spec.layers[layer].mlp_out, _ShiftOutput(shift))
    return Patch(parts=[part, *(extra or [])], method="shift", model_fingerprint=lm.fingerprint, model_name=lm.name)


def test_an_added_module_applies_reverts_and_round_trips(lm, tmp_path):
    before_state, before_logits = snapshot(lm), logits(lm)
    patch = shift_patch(lm, extra=[make_delta(lm, mlp_out(lm, 1), "low_rank", 4)])
    assert [type(p).__name__ for p in patch.parts] == ["WeightDelta", "ModuleAddition"]  # kind order
    assert patch.requires == ["weight_deltas", "module_additions"]
    patch.apply(lm)
    edited = logits(lm)
    assert not torch.equal(edited, before_logits)
    patch.revert(lm)
    assert_weights_equal(lm, before_state)
    assert torch.equal(logits(lm), before_logits)
    assert sum(len(m._forward_hooks) for m in lm.model.modules()) == 0

    loaded = Patch.load(patch.save(tmp_path / "shift.lmpatch"))
    assert loaded.patch_id == patch.patch_id and loaded.summary()["modules"][0]["type"] == "test.shift"
    with loaded.applied(lm):
        assert torch.equal(logits(lm), edited)


def test_the_low_precision_copy_runs_the_added_modules(llama):
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    patch = shift_patch(llama)
    with torch.no_grad():
        plain = llama.forward(input_ids=ids, compute_dtype=torch.bfloat16).logits
        with patch.applied(llama):
            shifted = llama.forward(input_ids=ids, compute_dtype=torch.bfloat16).logits
            exact = llama.forward(input_ids=ids).logits
        again = llama.forward(input_ids=ids, compute_dtype=torch.bfloat16).logits
    assert not torch.equal(plain, shifted) and torch.equal(plain, again)
    assert float((shifted.float() - exact).abs().max()) < 0.1 * float(exact.abs().max())


def test_an_unmergeable_addition_is_refused_by_merge(llama, tmp_path):
    patch = shift_patch(llama)
    assert not patch.mergeable
    with pytest.raises(PatchError, match="test.shift.*cannot express"):
        patch.merge(llama, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not patch.is_applied(llama)
    plain = make_patch(llama, [(mlp_out(llama, 0), "dense")])
    with patch.applied(llama):  # another applied patch that cannot be merged blocks the merge too
        with pytest.raises(PatchError, match="applied to the model too"):
            plain.merge(llama, tmp_path / "merged")


def test_a_missing_host_or_unknown_addition_type_is_one_clear_error(llama, tmp_path):
    patch = shift_patch(llama)
    wrong = Patch(parts=[ModuleAddition("model.layers.9.mlp", "test.shift", {}, {"shift": torch.ones(3)})],
                  method="shift", model_fingerprint=llama.fingerprint, model_name=llama.name)
    with pytest.raises(PatchError, match="model.layers.9.mlp.*does not have"):
        wrong.apply(llama)
    path = patch.save(tmp_path / "p.lmpatch")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["lmpatch"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest["modules"][0]["type"] = "test.from-the-future"
    del manifest["patch_id"]
    save_file(tensors, str(path), metadata={"lmpatch": json.dumps(manifest)})
    with pytest.raises(PatchError, match="test.from-the-future.*upgrade lmpatch"):
        Patch.load(path)


def test_compose_keeps_added_modules_in_order(llama):
    a, b = shift_patch(llama, seed=1), shift_patch(llama, seed=2)
    both = compose([a, b])
    assert len(both.modules) == 2
    with a.applied(llama), b.applied(llama):
        stacked = logits(llama)
    with both.applied(llama):
        assert torch.equal(logits(llama), stacked)
