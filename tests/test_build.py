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
    assert manifest["build"] == BuildConfig(projection="random", proj_dim=3, seed=4).to_dict()
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
