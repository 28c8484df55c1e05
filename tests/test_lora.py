"""LoRA adapters: the adapter matrices (A and B separately, peft's names kept) and trained head
copies as units, their projected gradients against exact per-example autograd, the exact
small (rank) sides, adapter folders through build and query (fingerprint included), a folder
written by ``train --lora-rank``, and a base model that cannot be found."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

peft = pytest.importorskip("peft")  # the [lora] extra

from conftest import random_batch, tiny_classifier  # noqa: E402
from test_causal_lm import (SHAPES, exact_unit_gradients, completion_loss, fact_rows, lm_batch,  # noqa: E402
                            one_line_error, projected, run, save_lm, tiny_lm, word_tokenizer, write_rows)
from lite_influence.api import InfluenceIndex, build_index  # noqa: E402
from lite_influence.errors import UserError  # noqa: E402
from lite_influence.gradients import ProjectedGradients, frozen  # noqa: E402
from lite_influence.layers import discover_units  # noqa: E402
from lite_influence.models import model_fingerprint  # noqa: E402
from lite_influence.projection import random_projector  # noqa: E402
from lite_influence.train import train_model  # noqa: E402

RANK = 2
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def with_lora(model, arch: str, task: str = "CAUSAL_LM", random_b: bool = True):
    """``model`` wrapped by peft. ``random_b``: B starts random instead of zero (peft's default
    zero B would make every A gradient zero, and the comparison vacuous)."""
    config = peft.LoraConfig(task_type=task, r=RANK, lora_alpha=4, target_modules=TARGETS[arch],
                             fan_in_fan_out=arch == "gpt2", init_lora_weights=not random_b,
                             modules_to_save=["classifier"] if arch == "bert" else None)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config).eval()


EXPECTED = {  # (name inside block i, role, in_dim, out_dim) for each LoRA unit
    "gpt2": ("base_model.model.transformer.h", [("attn.c_attn.lora_A.default", 16, RANK),
                                                ("attn.c_attn.lora_B.default", RANK, 48)]),
    "llama": ("base_model.model.model.layers", [("self_attn.q_proj.lora_A.default", 16, RANK),
                                                ("self_attn.q_proj.lora_B.default", RANK, 16),
                                                ("self_attn.v_proj.lora_A.default", 16, RANK),
                                                ("self_attn.v_proj.lora_B.default", RANK, 8)]),
    "bert": ("base_model.model.bert.encoder.layer", [("attention.self.query.lora_A.default", 16, RANK),
                                                     ("attention.self.query.lora_B.default", RANK, 16),
                                                     ("attention.self.value.lora_A.default", 16, RANK),
                                                     ("attention.self.value.lora_B.default", RANK, 16)]),
}


def lora_model(arch: str):
    if arch == "bert":
        return with_lora(tiny_classifier("bert"), arch, "SEQ_CLS")
    return with_lora(tiny_lm(arch, initializer_range=0.2), arch)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_lora_units_keep_peft_names(arch):
    model = lora_model(arch)
    blocks, inside = EXPECTED[arch]
    expected = [(f"{blocks}.{b}.{name}", "linear", "attention", b, n_in, n_out)
                for b in range(3) for name, n_in, n_out in inside]
    if arch == "bert":  # the trained copy of the head (modules_to_save), not the frozen original
        expected.append(("base_model.model.classifier.modules_to_save.default", "linear", "head", None, 17, 2))
    units = discover_units(model)
    assert [(u.name, u.kind, u.role, u.block, u.in_dim, u.out_dim) for u in units] == expected
    params = dict(model.named_parameters())
    assert all(p in params for u in units for p in u.params)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_width_lora_projection_equals_exact_gradient(arch):
    model = lora_model(arch)
    batch = lm_batch()
    units = discover_units(model)
    phi = projected(model, batch, [random_projector(u, 10_000, 0) for u in units])
    exact = exact_unit_gradients(model, units, [
        lambda row=row, p=p, n=n: completion_loss(model, batch["input_ids"][row, :n], p)
        for row, (p, n) in enumerate(SHAPES)])
    for unit in units:
        assert exact[unit.name].abs().sum() > 0, unit.name
        torch.testing.assert_close(phi[unit.name], exact[unit.name].flatten(1), rtol=1e-4, atol=1e-6)


def test_full_width_lora_classifier_with_trained_head():
    model = lora_model("bert")
    batch, labels = random_batch()
    units = discover_units(model)
    with frozen(model), ProjectedGradients(model, [random_projector(u, 10_000, 0) for u in units]) as capture:
        capture.mask = batch["attention_mask"].bool()
        F.cross_entropy(model(**batch).logits, labels, reduction="sum").backward()
        phi = capture.vectors()
    closures = []
    for row in range(len(labels)):
        n = int(batch["attention_mask"][row].sum())
        single = {k: v[row : row + 1, :n] for k, v in batch.items()}
        closures.append(lambda single=single, row=row: F.cross_entropy(model(**single).logits, labels[row : row + 1],
                                                                      reduction="sum"))
    exact = exact_unit_gradients(model, units, closures)
    for unit in units:
        torch.testing.assert_close(phi[unit.name], exact[unit.name].flatten(1), rtol=1e-4, atol=1e-6)


def test_rank_sides_are_kept_exactly_and_hidden_sides_projected():
    """The cut-off: a side of dimension <= proj_dim is the identity; A's out side and B's in
    side are the rank r."""
    units = discover_units(lora_model("llama"))
    for k in (2, 4):
        for unit in units:
            p = random_projector(unit, k, 0)
            small, large = ("out", "inp") if ".lora_A." in unit.name else ("inp", "out")
            assert getattr(p, small).matrix is None and getattr(p, small).k == RANK
            assert getattr(p, large).matrix is not None and getattr(p, large).k == k


# ---------------------------------------------------------------- adapter folders


@pytest.fixture()
def adapter_dir(tmp_path):
    """A tiny Llama base folder and a LoRA adapter folder on it (random B)."""
    base = save_lm(tmp_path / "base", "llama", initializer_range=0.2)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_lora(model, "llama").save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_folder_builds_lora_units_and_exact_vectors(adapter_dir, tmp_path):
    train = write_rows(tmp_path / "train.tsv", ("prompt", "completion"), fact_rows())
    index = build_index(adapter_dir, train, tmp_path / "index", projection="random", proj_dim=100,
                        layers="all", metric="dot")
    m = index.manifest
    assert m["model"]["task"] == "causal-lm" and m["model"]["adapter"] == "lora"
    assert m["model"]["base"] == str((tmp_path / "base").resolve())
    assert index.layers == ["block0", "block1", "block2"]  # no embeddings or head: they are frozen
    assert [u["name"] for u in m["layers"][0]["units"]] == [
        f"base_model.model.model.layers.0.{name}" for name, _, _ in EXPECTED["llama"][1]]
    # exact: the adapter loaded independently, per-example autograd of the LoRA weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter_dir).eval()
    tokenizer = word_tokenizer()
    units = discover_units(model)
    closures = []
    for prompt, completion in fact_rows():
        p = tokenizer(prompt)["input_ids"]
        ids = torch.tensor(p + tokenizer(completion, add_special_tokens=False)["input_ids"])
        closures.append(lambda ids=ids, n=len(p): completion_loss(model, ids, n))
    exact = exact_unit_gradients(model, units, closures)
    for layer in m["layers"]:
        expected = torch.cat([exact[u["name"]].flatten(1) for u in layer["units"]], 1).numpy()
        np.testing.assert_allclose(index.vectors(layer["name"]), expected, rtol=1e-4, atol=1e-6)
    assert index.query("good movie ->", completion=" bad", k=2)["proponents"]


def test_fingerprint_covers_adapter_weights(adapter_dir, tmp_path):
    import safetensors.torch

    train = write_rows(tmp_path / "train.tsv", ("prompt", "completion"), fact_rows())
    index = build_index(adapter_dir, train, tmp_path / "index", proj_dim=4)
    before = model_fingerprint(adapter_dir)
    assert before != model_fingerprint(tmp_path / "base")
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = tensors[name] + 1.0
    safetensors.torch.save_file(tensors, weights)
    assert model_fingerprint(adapter_dir) != before
    with pytest.raises(UserError, match="fingerprint"):
        InfluenceIndex.open(index.path).query("good movie ->", completion=" bad")


def test_train_lora_rank_folder_is_indexed(bert_dir, train_tsv, tmp_path):
    """``train --lora-rank`` writes out/adapter; building on it indexes A, B and the head copy."""
    out = tmp_path / "model"
    train_model(bert_dir, train_tsv, out, lora_rank=RANK, epochs=1, batch_size=4)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bert_dir.resolve())
    index = build_index(out / "adapter", out / "train_used.tsv", tmp_path / "index", proj_dim=4)
    m = index.manifest
    assert m["model"]["task"] == "classification" and m["label_names"] == ["negative", "positive"]
    units = [u for layer in m["layers"] for u in layer["units"]]
    assert units[-1]["name"] == "base_model.model.classifier.modules_to_save.default" and units[-1]["role"] == "head"
    lora = [u for u in units if ".lora_" in u["name"]]
    assert len(lora) == 3 * 4 and all(u["k_out"] == RANK for u in lora if ".lora_A." in u["name"])
    assert all(u["k_in"] == RANK for u in lora if ".lora_B." in u["name"])
    assert index.layers == ["block0", "block1", "block2", "head"]
    assert index.query("good movie", k=2)["proponents"]


def test_missing_base_model_is_one_line(adapter_dir, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(adapter_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "no/such/base"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    train = write_rows(tmp_path / "train.tsv", ("prompt", "completion"), fact_rows())
    code, _, err = run(capsys, "build", moved, train, "--out", tmp_path / "index")
    one_line_error(code, err, "base model 'no/such/base'", "looked in", str((moved / "no/such/base").resolve()))
