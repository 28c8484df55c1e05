"""Unit discovery, layer/group assignment and selectors on the tiny BERT, GPT-2 and Llama."""

from __future__ import annotations

import pytest

from conftest import tiny_classifier
from lite_influence.errors import UserError
from lite_influence.layers import (assign_layers, block_groups, discover_units, group_layers,
                                   select_units)

BLOCK_UNITS = {  # (suffix inside block i, kind, role, in features without bias, out features)
    "bert": [("attention.self.query", "linear", "attention", 16, 16),
             ("attention.self.key", "linear", "attention", 16, 16),
             ("attention.self.value", "linear", "attention", 16, 16),
             ("attention.output.dense", "linear", "attention", 16, 16),
             ("intermediate.dense", "linear", "mlp", 16, 24),
             ("output.dense", "linear", "mlp", 24, 16)],
    "gpt2": [("attn.c_attn", "conv1d", "attention", 16, 48),
             ("attn.c_proj", "conv1d", "attention", 16, 16),
             ("mlp.c_fc", "conv1d", "mlp", 16, 64),
             ("mlp.c_proj", "conv1d", "mlp", 64, 16)],
    "llama": [("self_attn.q_proj", "linear", "attention", 16, 16),
              ("self_attn.k_proj", "linear", "attention", 16, 8),
              ("self_attn.v_proj", "linear", "attention", 16, 8),
              ("self_attn.o_proj", "linear", "attention", 16, 16),
              ("mlp.gate_proj", "linear", "mlp", 16, 24),
              ("mlp.up_proj", "linear", "mlp", 16, 24),
              ("mlp.down_proj", "linear", "mlp", 24, 16)],
}
NAMES = {  # embeddings, blocks prefix, head, whether linears carry a bias
    "bert": ("bert.embeddings.word_embeddings", "bert.encoder.layer", "classifier", True),
    "gpt2": ("transformer.wte", "transformer.h", "score", True),
    "llama": ("model.embed_tokens", "model.layers", "score", False),
}


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_classifier(arch) for arch in NAMES}


@pytest.mark.parametrize("arch", list(NAMES))
def test_units_have_the_expected_names_kinds_and_shapes(models, arch):
    embeddings, blocks, head, bias = NAMES[arch]
    expected = [(embeddings, "embedding", "embeddings", None, 64, 16)]
    for block in range(3):
        expected += [(f"{blocks}.{block}.{suffix}", kind, role, block, n_in + bias, n_out)
                     for suffix, kind, role, n_in, n_out in BLOCK_UNITS[arch]]
    head_bias = arch == "bert"  # GPT-2 and Llama score heads have no bias
    expected.append((head, "linear", "head", None, 16 + head_bias, 2))
    units = discover_units(models[arch])
    assert [(u.name, u.kind, u.role, u.block, u.in_dim, u.out_dim) for u in units] == expected
    for unit in units:  # every listed parameter exists and has the unit's shape
        params = dict(models[arch].named_parameters())
        weight = params[unit.params[0]]
        if unit.kind == "linear":
            assert tuple(weight.shape) == (unit.out_dim, unit.in_dim - unit.has_bias)
        else:  # Conv1D stores (in, out); the embedding (vocab, hidden)
            assert tuple(weight.shape) == (unit.in_dim - unit.has_bias, unit.out_dim)
        assert (len(unit.params) == 2) == unit.has_bias


def test_gpt2_conv1d_is_transposed_relative_to_linear(models):
    module = models["gpt2"].get_submodule("transformer.h.0.attn.c_attn")
    unit = next(u for u in discover_units(models["gpt2"]) if u.name == "transformer.h.0.attn.c_attn")
    assert type(module).__name__ == "Conv1D"
    assert module.weight.shape == (16, 48)  # (in, out), the transpose of nn.Linear's
    assert (unit.in_dim, unit.out_dim) == (17, 48)


def names(units):
    return {u.name for u in units}


@pytest.mark.parametrize("arch", list(NAMES))
def test_selectors(models, arch):
    units = discover_units(models[arch])
    embeddings, blocks, head, _ = NAMES[arch]
    attention = {u.name for u in units if u.role == "attention"}
    mlp = {u.name for u in units if u.role == "mlp"}
    assert len(attention) == 3 * sum(r == "attention" for _, _, r, _, _ in BLOCK_UNITS[arch])
    assert names(select_units(units, "attention")) == attention | {embeddings, head}
    assert names(select_units(units, "mlp")) == mlp
    assert names(select_units(units, "all")) == names(units)
    assert names(select_units(units, "embeddings")) == {embeddings}
    assert names(select_units(units, "head")) == {head}
    for group, block in (("early", 0), ("middle", 1), ("late", 2)):  # thirds of 3 blocks
        assert names(select_units(units, group)) == {n for n in attention if n.startswith(f"{blocks}.{block}.")}
    assert names(select_units(units, "block1")) == {n for n in attention if n.startswith(f"{blocks}.1.")}
    assert names(select_units(units, "block2,head")) == \
        {n for n in attention if n.startswith(f"{blocks}.2.")} | {head}
    # a regex over module names picks any unit, MLP included
    assert names(select_units(units, r"\.1\.mlp\.|\.1\.(intermediate|output)\.dense")) == \
        {n for n in mlp if n.startswith(f"{blocks}.1.")}
    # selection keeps forward order
    picked = select_units(units, "head,embeddings")
    assert [u.name for u in picked] == [embeddings, head]


@pytest.mark.parametrize("term", ["nope", "block7", "[unclosed", "mlp,bogus"])
def test_unknown_selector_says_what_is_valid(models, term):
    units = discover_units(models["bert"])
    with pytest.raises(UserError) as error:
        select_units(units, term)
    message = str(error.value)
    assert "matches no unit" in message and "\n" not in message
    for valid in ("attention", "mlp", "all", "early", "middle", "late", "block0..block2", "regex"):
        assert valid in message
    assert "--units" not in message  # no pointer to a flag that does not exist


def test_empty_selector_is_refused(models):
    with pytest.raises(UserError, match="empty layer selector"):
        select_units(discover_units(models["bert"]), " , ")


@pytest.mark.parametrize("n, expected", [
    (6, {"early": [0, 1], "middle": [2, 3], "late": [4, 5]}),
    (3, {"early": [0], "middle": [1], "late": [2]}),
    (12, {"early": [0, 1, 2, 3], "middle": [4, 5, 6, 7], "late": [8, 9, 10, 11]}),
    (7, {"early": [0, 1, 2], "middle": [3, 4], "late": [5, 6]}),
])
def test_block_groups_are_thirds(n, expected):
    assert block_groups(n) == expected


def test_group_layers_for_six_blocks():
    layer_blocks = {"embeddings": None, **{f"block{b}": b for b in range(6)}, "head": None}
    assert group_layers(layer_blocks, 6) == {
        "embeddings": ["embeddings"], "early": ["block0", "block1"], "middle": ["block2", "block3"],
        "late": ["block4", "block5"], "head": ["head"], "all": list(layer_blocks)}
    # a selection of blocks keeps the model's thirds (n_blocks is the model's, not the selection's)
    assert group_layers({"block2": 2, "block3": 3}, 6) == {
        "middle": ["block2", "block3"], "all": ["block2", "block3"]}


def test_assign_layers_by_block_or_by_unit(models):
    units = select_units(discover_units(models["bert"]), "attention")
    by_layer = assign_layers(units, "layer")
    assert list(by_layer) == ["embeddings", "block0", "block1", "block2", "head"]
    assert [u.name for u in by_layer["block1"]] == [
        f"bert.encoder.layer.1.{s}" for s in ("attention.self.query", "attention.self.key",
                                              "attention.self.value", "attention.output.dense")]
    by_unit = assign_layers(units, "unit")
    assert list(by_unit) == ["embeddings", *[u.name for u in units if u.block is not None], "head.classifier"]
    assert all(len(members) == 1 for members in by_unit.values())
    with pytest.raises(UserError, match="granularity"):
        assign_layers(units, "block")
