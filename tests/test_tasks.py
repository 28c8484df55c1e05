"""The Task of each model kind: a classification query is one forward and one backward pass
whose vectors equal those of the old two-pass path (predict, then the gradient at that
label), and the task, not the caller, decides reading, encoding and description."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import WORDS, dense_rows
from lite_influence import build_index
from lite_influence.errors import UserError
from lite_influence.models import encode, predict
from lite_influence.tasks import PREDICTED, CausalLMTask, ClassificationTask, task_of

TEXTS = ["good film", "awful plot was dull", "the actor is very nice", "not quite a story"]


@pytest.fixture(scope="module")
def index(bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    rows = [f"{' '.join(WORDS[i % len(WORDS)] for i in range(j, j + 3 + j % 4))}\t{j % 2}" for j in range(10)]
    train = root / "train.tsv"
    train.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return build_index(bert_dir, train, root / "idx", projection="random", proj_dim=3, layers="all")


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_a_query_without_label_is_one_forward_and_equals_the_two_pass_path(index):
    session = index.session()
    calls, handle = count_forwards(session.loaded.model)
    try:
        one_pass = index.gradients(TEXTS, batch_size=len(TEXTS))
    finally:
        handle.remove()
    assert len(calls) == 1  # one batch: one forward (and its backward), no separate predict
    encodings = encode(session.loaded, TEXTS, None, session.max_length)
    old_prediction = predict(session.loaded, encodings)  # what the old path ran first
    explicit = index.gradients(TEXTS, labels=[int(p) for p in old_prediction], batch_size=len(TEXTS))
    assert np.array_equal(one_pass.predicted, old_prediction)
    assert np.array_equal(one_pass.labels, old_prediction) and one_pass.correct.all()
    for layer in index.layers:
        np.testing.assert_array_equal(dense_rows(index, layer, one_pass.vectors[layer]),
                                      dense_rows(index, layer, explicit.vectors[layer]))
    np.testing.assert_allclose(one_pass.losses, explicit.losses, rtol=1e-6)


def test_mixed_given_and_missing_labels(index):
    predicted = index.gradients(TEXTS).predicted
    wrong = [None, int(1 - predicted[1]), None, int(predicted[3])]
    grads = index.gradients(TEXTS, labels=wrong)
    assert grads.labels.tolist() == [predicted[0], 1 - predicted[1], predicted[2], predicted[3]]
    assert grads.correct.tolist() == [True, False, True, True]
    alone = index.gradients([TEXTS[1]], labels=[int(1 - predicted[1])])
    for layer in index.layers:
        np.testing.assert_allclose(dense_rows(index, layer, grads.vectors[layer])[1],
                                   dense_rows(index, layer, alone.vectors[layer])[0], rtol=1e-4, atol=1e-6)


def test_predicted_target_is_the_argmax_of_the_same_logits(index):
    import torch

    session = index.session()
    from lite_influence.models import collate

    batch = collate(session.loaded, encode(session.loaded, TEXTS, None, 32))
    with torch.no_grad():
        losses, logits = ClassificationTask().losses(session.loaded, batch, torch.full((4,), PREDICTED))
        expected = torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="none")
    torch.testing.assert_close(losses, expected)


def test_describe_gives_the_softmax_probability_of_the_prediction(index):
    grads = index.gradients(TEXTS[:1])
    described = task_of("classification").describe(grads, 0, TEXTS, None, index.manifest["label_names"])
    logits = grads.logits[0]
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert described["prediction"]["label"] == int(logits.argmax())
    assert described["prediction"]["probability"] == pytest.approx(float(p.max()))


def test_task_of_names_and_unknown_task():
    assert isinstance(task_of(None), ClassificationTask) and isinstance(task_of("causal-lm"), CausalLMTask)
    with pytest.raises(UserError, match="unknown task 'seq2seq'"):
        task_of("seq2seq")


def test_each_task_refuses_the_other_kinds_query_flags():
    with pytest.raises(UserError, match="--completion is for causal"):
        ClassificationTask().check_query(completion="x")
    with pytest.raises(UserError, match="not --pair or --label"):
        CausalLMTask().check_query(label="1")
    ClassificationTask().check_query(pair="p", label="1")
    CausalLMTask().check_query(completion=" x")


def test_the_causal_task_reads_prompts_and_refuses_pairs(tmp_path):
    path = tmp_path / "lm.tsv"
    path.write_text("prompt\tcompletion\nkey k1 ->\t value v1\n")
    examples = CausalLMTask().read(path)
    assert examples.texts == ["key k1 ->"] and examples.completions == [" value v1"]
    with pytest.raises(UserError, match="not a text pair"):
        CausalLMTask().read(path, pair_col="completion")
