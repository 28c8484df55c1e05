"""models.py: loading a folder, task detection, fingerprints and the token limit."""

from __future__ import annotations

import shutil

import pytest
import transformers

from lite_influence.errors import UserError
from lite_influence.models import detect_task, is_model_folder, load_model, model_fingerprint, token_limit


def test_fingerprint_follows_the_weights_not_the_path(bert_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bert_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(bert_dir)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(bert_dir)


def test_fingerprint_covers_the_tokenizer_and_old_indexes_still_verify(bert_dir, tmp_path):
    from lite_influence.models import fingerprint_matches, legacy_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(bert_dir, copy)
    tokenizer = next(f for f in copy.iterdir() if f.name in ("tokenizer.json", "vocab.txt"))
    tokenizer.write_text(tokenizer.read_text().replace("the", "teh", 1))  # same weights, other tokenizer
    assert model_fingerprint(copy) != model_fingerprint(bert_dir)
    assert not fingerprint_matches(copy, model_fingerprint(bert_dir))
    assert fingerprint_matches(copy, legacy_fingerprint(bert_dir))  # a pre-v2 index knew no tokenizer


@pytest.mark.parametrize("architectures, task", [(["GPT2LMHeadModel"], "causal-lm"), (["LlamaForCausalLM"], "causal-lm"),
                                                 (["BertForSequenceClassification"], "classification"), (None, "classification")])
def test_detect_task(architectures, task):
    assert detect_task(transformers.PretrainedConfig(architectures=architectures)) == task


def test_load_model_is_in_eval_mode_with_its_labels(bert_dir):
    loaded = load_model(bert_dir)
    assert loaded.task == "classification" and not loaded.model.training
    assert loaded.label2id == {"negative": 0, "positive": 1} and loaded.num_labels == 2
    assert loaded.kind.name == "classification"


def test_token_limit_never_exceeds_the_position_embeddings(bert_dir):
    loaded = load_model(bert_dir)
    assert token_limit(loaded, 10) == 10
    assert token_limit(loaded, 10_000) == loaded.model.config.max_position_embeddings == 64


def test_not_a_model_folder(tmp_path):
    assert not is_model_folder(tmp_path)
    with pytest.raises(UserError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="unknown task"):
        (tmp_path / "config.json").write_text("{}")
        load_model(tmp_path, task="seq2seq")
