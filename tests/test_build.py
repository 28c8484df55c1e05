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
    assert all(layer["dim"] == sum(u["k_in"] * u["k_out"] for u in layer["units"]) for layer in manifest["layers"])


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
