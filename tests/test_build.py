"""build.py: the manifest records the build options once, and the API refuses bad options
with the CLI's words before it touches --out."""

from __future__ import annotations

import pytest

from lite_influence import build_index
from lite_influence.config import BuildConfig
from lite_influence.errors import UserError


def test_manifest_records_the_build_config_once(bert_dir, train_tsv, tmp_path):
    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=3, seed=4)
    manifest = index.manifest
    assert manifest["build"] == BuildConfig(projection="random", proj_dim=3, seed=4).validate().to_dict()
    assert not {"seed", "proj_dim", "projection", "granularity"} & set(manifest)
    assert manifest["n"] == 12 and manifest["model"]["task"] == "classification"
    dense = [layer for layer in manifest["layers"] if layer.get("kind") != "tokens"]
    assert all(layer["dim"] == sum(u["k_in"] * u["k_out"] for u in layer["units"]) for layer in dense)
    tokens, = [layer for layer in manifest["layers"] if layer.get("kind") == "tokens"]
    assert tokens["name"] == "embeddings" and tokens["dim"] == tokens["units"][0]["k_out"] == 16  # the tiny hidden size (16 < 64): exact


@pytest.mark.parametrize("options, words", [({"proj_dim": 0}, "--proj-dim must be at least 1"),
                                            ({"metric": "l2"}, "unknown metric"),
                                            ({"index_factory": "NoSuchIndex"}, "not a FAISS index factory")])
def test_bad_options_are_refused_before_anything_is_written(bert_dir, train_tsv, tmp_path, options, words):
    out = tmp_path / "idx"
    with pytest.raises(UserError, match=words):
        build_index(bert_dir, train_tsv, out, **options)
    assert [p.name for p in tmp_path.iterdir()] == [train_tsv.name]  # no --out, no partial


def test_unknown_option_is_a_type_error(bert_dir, train_tsv, tmp_path):
    with pytest.raises(TypeError):
        build_index(bert_dir, train_tsv, tmp_path / "idx", proj_dims=4)


def test_proj_dim_wider_than_the_model_is_said_once_with_the_stored_dims(bert_dir, train_tsv, tmp_path, capsys):
    """The tiny BERT is 16 wide: --proj-dim 20 cannot give 20 x 20 per unit, and says so (a
    warning, not an error) with the dims each block really stores."""
    from conftest import run_cli
    from lite_influence.errors import InputWarning

    with pytest.warns(InputWarning, match=r"--proj-dim 20 exceeds the sides of 4 units \(hidden 16\)") as caught:
        index = build_index(bert_dir, train_tsv, tmp_path / "api", projection="random", proj_dim=20,
                            exact_max=0, layers="block1")
    dim = index.manifest["layers"][0]["dim"]
    assert dim == 4 * 17 * 16 and f"{dim:,} dims per block instead of {4 * 20 * 20:,}" in str(caught[0].message)

    code, _, err = run_cli(capsys, "-q", "build", bert_dir, train_tsv, "--out", tmp_path / "cli", "--projection", "random",
                           "--proj-dim", "20", "--exact-max", "0")
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --proj-dim 20 exceeds the sides of"), err
    assert "stored at their full width, 1,088 dims per block instead of 1,600" in lines[0]
    # the default (8 per side) is narrower than the model, and the head's 2-class side is expected
    code, _, err = run_cli(capsys, "-q", "build", bert_dir, train_tsv, "--out", tmp_path / "default",
                           "--projection", "random", "--exact-max", "0")
    assert code == 0 and err == "", err


@pytest.mark.parametrize("data, words", [
    ("review\tlabel\ngood film\t1\n", "no text column"),
    (b"sentence\tlabel\ncaf\xe9 film\t1\n", "not UTF-8"),
    ("sentence\tlabel\ngood film\t\n", "no label in column 'label'"),
])
def test_a_bad_data_file_is_reported_before_the_model_loads(bert_dir, tmp_path, monkeypatch, data, words):
    """Reading the file takes milliseconds, loading a model seconds: the file's error comes first."""
    import lite_influence.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr(lite_influence.models, "load_model", no_model)
    train = tmp_path / "train.tsv"
    (train.write_bytes if isinstance(data, bytes) else train.write_text)(data)
    with pytest.raises(UserError, match=words):
        build_index(bert_dir, train, tmp_path / "idx", projection="random")


def test_label_names_for_a_head_without_names_point_at_train_label_names(tmp_path, bert_dir):
    """A new head's classes are LABEL_0, LABEL_1: a file that names its classes says how to name them."""
    import shutil

    import torch
    import transformers
    from conftest import tiny_config

    base = tmp_path / "base"
    torch.manual_seed(0)
    transformers.BertModel(tiny_config("bert")).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (bert_dir / name).is_file():
            shutil.copy(bert_dir / name, base / name)
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood film\tBusiness\nbad plot\tSports\n")
    with pytest.raises(UserError, match=r"label 'Business' in row 1 of .*train\.tsv is a name, but the model's "
                                        r"classes have none yet \(0 \(LABEL_0\), 1 \(LABEL_1\).*"
                                        r"lite-influence train --label-names"):
        build_index(base, train, tmp_path / "idx", projection="random")


def test_stored_exact_norms_are_the_full_gradients_norms(bert_dir, train_tsv, tmp_path):
    """A k=2 sketch keeps a fraction of each gradient, but the norms it stores beside it are
    those of the whole gradient: the norms of a full-width build's vectors (which are G itself,
    tests/test_gradients.py), and the audit's self-influence is their square."""
    import numpy as np

    small = build_index(bert_dir, train_tsv, tmp_path / "small", projection="random", proj_dim=2,
                        token_dim=0, seed=0)
    whole = build_index(bert_dir, train_tsv, tmp_path / "whole", projection="random", proj_dim=10_000,
                        exact_max=10**9, token_dim=0, seed=0)
    for layer in small.layers:
        full = np.linalg.norm(whole.store.layer(layer).vectors(None, "dot").astype(np.float64), axis=1)
        stored = small.store.layer(layer).exact.values()
        np.testing.assert_allclose(stored, full, rtol=1e-4)
        sketch = np.linalg.norm(small.store.layer(layer).vectors(None, "dot").astype(np.float64), axis=1)
        if small.store.layer_info(layer)["dim"] < whole.store.layer_info(layer)["dim"]:  # not stored whole
            assert not np.allclose(sketch, full, rtol=0.05)  # the sketch's own norms are not these
        # what `info` shows as "kept": the median share of the squared norm the sketch keeps
        assert small.store.layer(layer).kept_share() == pytest.approx(np.median((sketch / full) ** 2), rel=1e-4)
        assert whole.store.layer(layer).kept_share() == pytest.approx(1.0, rel=1e-4)
