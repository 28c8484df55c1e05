"""session.Session: an index's model side at query time, verified against the index."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import dense_rows
from lite_influence import InfluenceIndex, build_index
from lite_influence.errors import UserError
from lite_influence.session import Session


@pytest.fixture()
def built(bert_dir, train_tsv, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    index = build_index(model, train_tsv, tmp_path / "idx", projection="random", proj_dim=2, layers="all")
    return model, index


def test_session_reproduces_the_stored_vectors(built, train_tsv):
    """Query gradients of the training rows at their own labels are the stored vectors (unit
    rows: the index's metric is cosine)."""
    _, index = built
    rows = [line.split("\t") for line in train_tsv.read_text().splitlines()[1:]]
    grads = Session(index.manifest, index.store).gradients([r[0] for r in rows], labels=[int(r[1]) for r in rows])
    for layer in index.layers:
        mine = dense_rows(index, layer, grads.vectors[layer])
        np.testing.assert_allclose(mine / np.linalg.norm(mine, axis=1, keepdims=True), dense_rows(index, layer),
                                   rtol=1e-4, atol=1e-6)


def test_a_retrained_model_is_refused(built):
    model, index = built
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    with pytest.raises(UserError, match="fingerprint mismatch"):
        Session(index.manifest, index.store)


def test_a_moved_model_is_refused_then_found(built, tmp_path):
    model, index = built
    moved = tmp_path / "moved"
    model.rename(moved)
    with pytest.raises(UserError, match="is missing"):
        Session(index.manifest, index.store)
    assert Session(index.manifest, index.store, moved).layers.keys() == set(index.layers)
    assert InfluenceIndex.open(index.path, model=moved).gradients(["good film"]).vectors.keys() == set(index.layers)


def test_an_edited_manifest_is_refused(built):
    _, index = built
    manifest = json.loads(json.dumps(index.manifest))
    manifest["layers"][0]["dim"] += 1
    with pytest.raises(UserError, match="edited or damaged"):
        Session(manifest, index.store)
    manifest = json.loads(json.dumps(index.manifest))
    manifest["layers"][0]["units"][0]["name"] = "bert.no_such_unit"
    with pytest.raises(UserError, match="has no unit"):
        Session(manifest, index.store)
