"""Fine-tuning (``train_model``): it learns, keeps the right epoch, flips labels as recorded,
saves folders that load back to the same logits, and never touches --out when it fails.

References are independent of the training code: losses and logits are recomputed from the
saved folder with ``load_model`` and one example per forward pass (no padding, no batching).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import WORDS, tiny_classifier, tiny_config
from lite_influence.config import TrainConfig
from lite_influence.data import flip_labels, load_examples, read_rows
from lite_influence.errors import UserError
from lite_influence.models import collate, encode, load_model
from lite_influence.train import head_modules, lora_targets, train_model

FILLER = [w for w in WORDS if w not in ("good", "bad")]
FAST = dict(lr=1e-2, batch_size=4)  # a tiny random BERT needs a large step to learn in seconds


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def word_bert(bert_dir):
    """The tiny BERT of conftest, whose word-level tokenizer lets a rule about words be learned."""
    return bert_dir


def rule_rows(n: int, seed: int, invert: bool = False, names: bool = False) -> list[dict]:
    """Sentences with "good" (label 1) or "bad" (label 0) among filler words; alternating labels."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), "good" if label else "bad")
        label = 1 - label if invert else label
        rows.append({"sentence": " ".join(words), "label": ["negative", "positive"][label] if names else label})
    return rows


def write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    path.write_text("\t".join(columns) + "\n"
                    + "".join("\t".join(str(r[c]) for c in columns) + "\n" for r in rows))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_by_one(loaded, path) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, one unpadded example per forward pass."""
    examples = load_examples(path, label2id=loaded.label2id)
    tokenizer, model = loaded.tokenizer, loaded.model.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for text, label in zip(examples.texts, examples.labels):
            logits = model(**tokenizer(text, return_tensors="pt")).logits
            losses.append(F.cross_entropy(logits, torch.tensor([label])).item())
            correct += int(logits.argmax(-1).item() == label)
    return float(np.mean(losses)), correct / len(losses)


def batch_logits(loaded, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model.eval()(**collate(loaded, encode(loaded, texts, None, 64))).logits


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def rule_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rule")
    return {"train": write_tsv(folder / "train.tsv", rule_rows(40, seed=1)),
            "eval": write_tsv(folder / "eval.tsv", rule_rows(20, seed=2)),
            "inverse": write_tsv(folder / "inverse.tsv", rule_rows(20, seed=2, invert=True)),
            "folder": folder}


@pytest.fixture(scope="module")
def trained(word_bert, rule_data):
    out = rule_data["folder"] / "model"
    result = train_model(word_bert, rule_data["train"], out, eval_file=str(rule_data["eval"]), epochs=5, **FAST)
    return result


# ---------------------------------------------------------------- full fine-tuning


def test_learns_a_word_rule(word_bert, rule_data, trained):
    start_loss, _ = one_by_one(load_model(word_bert), rule_data["train"])
    end_loss, _ = one_by_one(load_model(trained.out), rule_data["train"])
    assert end_loss < 0.5 * start_loss, (start_loss, end_loss)
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]
    eval_loss, accuracy = one_by_one(load_model(trained.out), rule_data["eval"])
    assert accuracy >= 0.9
    assert trained.history[trained.chosen_epoch - 1]["eval_accuracy"] == pytest.approx(accuracy)


def test_saved_folder_loads_to_the_same_logits(rule_data, trained):
    out = trained.out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_used.tsv", "training.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter").exists()
    assert siblings(out) == []
    reloaded = load_model(out)
    texts = load_examples(rule_data["eval"]).texts
    torch.testing.assert_close(batch_logits(reloaded, texts), batch_logits(trained.loaded, texts), rtol=0, atol=1e-6)
    assert reloaded.label2id == {"negative": 0, "positive": 1}  # bert_dir's names are kept


def test_training_json_and_train_used_without_noise(rule_data, trained):
    report = json.loads((trained.out / "training.json").read_text())
    assert report["config"] == TrainConfig(eval_file=str(rule_data["eval"]), epochs=5, **FAST).to_dict()
    assert report["effective"]["lr"] == 1e-2 and report["effective"]["mode"] == "full"
    assert report["effective"]["total_steps"] == 5 * 10 and report["effective"]["warmup_steps"] == 5
    assert report["history"] == trained.history and len(report["history"]) == 5
    assert report["chosen_epoch"] == trained.chosen_epoch and report["chosen_by"] == "lowest eval loss"
    assert report["n_noisy"] == 0 and report["n_train"] == 40 and report["n_eval"] == 20
    assert report["initial_eval"]["eval_loss"] > 0 and report["seconds"] > 0
    rows, columns = read_rows(trained.out / "train_used.tsv")
    original, _ = read_rows(rule_data["train"])
    assert columns == ["sentence", "label", "noisy", "label_original"]
    assert [r["sentence"] for r in rows] == [r["sentence"] for r in original]
    assert all(r["noisy"] == "0" and r["label"] == r["label_original"] for r in rows)


def test_keeps_the_epoch_with_the_lowest_eval_loss(word_bert, rule_data, tmp_path):
    """The eval labels invert the training rule, so learning it makes eval loss rise and an
    early epoch must be kept, not the last."""
    out = tmp_path / "model"
    result = train_model(word_bert, rule_data["train"], out, eval_file=str(rule_data["inverse"]), epochs=5, **FAST)
    report = json.loads((out / "training.json").read_text())
    losses = [h["eval_loss"] for h in report["history"]]
    assert report["chosen_epoch"] == result.chosen_epoch == int(np.argmin(losses)) + 1
    assert result.chosen_epoch < 5 and losses[-1] > min(losses) + 0.1
    recomputed, _ = one_by_one(load_model(out), rule_data["inverse"])
    assert recomputed == pytest.approx(losses[result.chosen_epoch - 1], rel=1e-4)
    assert abs(recomputed - losses[-1]) > 0.1


# ---------------------------------------------------------------- label noise


@pytest.mark.parametrize("fmt", ["tsv-ids", "jsonl-names"])
def test_noise_flips_exactly_the_recorded_rows(word_bert, tmp_path, fmt):
    rows = rule_rows(40, seed=4, names=fmt == "jsonl-names")
    train = (write_tsv(tmp_path / "train.tsv", rows) if fmt == "tsv-ids"
             else write_jsonl(tmp_path / "train.jsonl", rows))
    out = tmp_path / "model"
    result = train_model(word_bert, train, out, noise=0.25, seed=3, epochs=1, batch_size=8)
    used, columns = read_rows(out / f"train_used.{'tsv' if fmt == 'tsv-ids' else 'jsonl'}")
    assert columns == ["sentence", "label", "noisy", "label_original"]
    assert [r["sentence"] for r in used] == [r["sentence"] for r in rows]
    noisy = [int(r["noisy"]) == 1 for r in used]
    assert sum(noisy) == round(0.25 * 40) == result.n_noisy == 10
    assert json.loads((out / "training.json").read_text())["n_noisy"] == 10
    for row, was, flag in zip(used, rows, noisy):
        assert str(row["label_original"]) == str(was["label"])
        assert (str(row["label"]) != str(row["label_original"])) == flag
    # the same seeded flips as data.flip_labels, and the labels keep the input's form (id or name)
    ids = np.array([r["label"] if fmt == "tsv-ids" else ["negative", "positive"].index(r["label"]) for r in rows])
    flipped, mask = flip_labels(ids, 0.25, 2, 3)
    assert noisy == mask.tolist()
    written = [int(r["label"]) if fmt == "tsv-ids" else ["negative", "positive"].index(r["label"]) for r in used]
    assert written == flipped.tolist()
    # without an eval file the last epoch is kept
    assert result.chosen_epoch == 1 and "eval_loss" not in result.history[0]


def test_retraining_on_train_used_keeps_the_ground_truth(word_bert, tmp_path):
    train = write_tsv(tmp_path / "train.tsv", rule_rows(20, seed=5))
    first = train_model(word_bert, train, tmp_path / "a", noise=0.2, epochs=1, limit=16)
    again = train_model(word_bert, tmp_path / "a" / "train_used.tsv", tmp_path / "b", epochs=1)
    before, _ = read_rows(tmp_path / "a" / "train_used.tsv")
    after, columns = read_rows(tmp_path / "b" / "train_used.tsv")
    assert len(before) == 16  # --limit: only the rows trained on
    assert after == before and columns == ["sentence", "label", "noisy", "label_original"]
    assert first.n_noisy == again.n_noisy == 3


def test_input_noisy_flags_are_read_with_config_truthy(word_bert, tmp_path):
    """train_used's ``noisy`` is the OR of this run's flips and the input's flags, and the input's
    are read as every other command reads a flag (config.truthy): "t" and "TRUE" count too."""
    from lite_influence.config import truthy

    flags = ["1", "1.0", "true", "t", "TRUE", " yes ", "y", "0", "", "no", "false", "f"]
    rows = [{**row, "noisy": flag} for row, flag in zip(rule_rows(len(flags), seed=3), flags)]
    train = write_tsv(tmp_path / "train.tsv", rows)
    result = train_model(word_bert, train, tmp_path / "model", epochs=1)
    used, _ = read_rows(tmp_path / "model" / "train_used.tsv")
    assert [r["noisy"] for r in used] == [str(int(truthy(flag))) for flag in flags]
    assert [r["noisy"] for r in used] == ["1"] * 7 + ["0"] * 5 and result.n_noisy == 7


def headless(bert_dir, folder: Path) -> Path:
    """conftest's tiny BERT without a classification head (a base encoder), with its tokenizer."""
    torch.manual_seed(0)
    transformers.BertModel(tiny_config("bert")).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (bert_dir / name).is_file():
            shutil.copy(bert_dir / name, folder / name)
    return folder


def test_label_names_for_a_new_head_are_asked_for_by_flag(tmp_path, bert_dir):
    """A new head's classes are LABEL_0, LABEL_1: a file that names its classes ("Business")
    is told to pass --label-names, with the names it uses; with them it trains."""
    base = headless(bert_dir, tmp_path / "base")
    rows = [{"sentence": f"{w} movie", "label": ["Business", "Sports"][i % 2]} for i, w in enumerate(WORDS)]
    train = write_tsv(tmp_path / "train.tsv", rows)
    with pytest.raises(UserError, match=r"label 'Business' in row 1 of .*train\.tsv is a name, but the model's classes "
                                        r"have none yet.*pass --label-names .* e\.g\. --label-names Business,Sports") as error:
        train_model(base, train, tmp_path / "refused", epochs=1)
    assert "\n" not in str(error.value) and not (tmp_path / "refused").exists()
    eval_file = write_tsv(tmp_path / "eval.tsv", rows[:4])
    with pytest.raises(UserError, match=r"eval\.tsv is a name.*--label-names Business,Sports"):
        train_model(base, write_tsv(tmp_path / "ids.tsv", [{**r, "label": i % 2} for i, r in enumerate(rows)]),
                    tmp_path / "refused", epochs=1, eval_file=str(eval_file))
    result = train_model(base, train, tmp_path / "model", epochs=1, label_names="Business,Sports")
    assert load_model(result.out).label2id == {"Business": 0, "Sports": 1}


@pytest.mark.parametrize("data, words", [
    ("review\tlabel\ngood film\t1\n", "no text column"),
    (b"sentence\tlabel\ncaf\xe9 film\t1\n", "not UTF-8"),
    ("sentence\tlabel\ngood film\t\n", "no label in column 'label'"),
])
@pytest.mark.parametrize("which", ["train", "eval"])
def test_a_bad_data_file_is_reported_before_the_model_loads(word_bert, train_tsv, tmp_path, monkeypatch, data, words, which):
    """Reading a file takes milliseconds, loading a model seconds: the files' errors come first."""
    import lite_influence.train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data files were checked")

    monkeypatch.setattr(lite_influence.train, "load_model", no_model)
    bad = tmp_path / "bad.tsv"
    (bad.write_bytes if isinstance(data, bytes) else bad.write_text)(data)
    train, eval_file = (bad, None) if which == "train" else (train_tsv, str(bad))
    with pytest.raises(UserError, match=words):
        train_model(word_bert, train, tmp_path / "out", epochs=1, eval_file=eval_file)


def test_new_head_of_num_labels(tmp_path, bert_dir):
    base = headless(bert_dir, tmp_path / "base")
    rows = [{"sentence": f"{w} movie", "label": i % 3} for i, w in enumerate(WORDS)]
    train = write_tsv(tmp_path / "train.tsv", rows)
    with pytest.raises(UserError, match=r"3 classes.*head has 2 classes; pass --num-labels 3"):
        train_model(base, train, tmp_path / "refused", epochs=1)
    assert not (tmp_path / "refused").exists()
    result = train_model(base, train, tmp_path / "model", num_labels=3, epochs=1, noise=0.4)
    reloaded = load_model(tmp_path / "model")
    assert reloaded.num_labels == 3 and reloaded.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert result.n_noisy == round(0.4 * len(rows)) == 8


# ---------------------------------------------------------------- LoRA


def test_lora_trains_and_saves_merged_model_and_adapter(word_bert, rule_data, tmp_path):
    pytest.importorskip("peft")  # the [lora] extra
    out = tmp_path / "lora"
    result = train_model(word_bert, rule_data["train"], out, lora_rank=2, epochs=2, batch_size=8,
                         eval_file=rule_data["eval"])  # a Path is fine from Python
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 4 and set(adapter["target_modules"]) == {"query", "value"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "training.json").read_text())
    assert report["effective"]["lr"] == 1e-3 and report["effective"]["mode"] == "lora"
    assert report["effective"]["modules_to_save"] == ["classifier"]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)

    reloaded = load_model(out)
    assert not any("lora" in name for name, _ in reloaded.model.named_parameters())
    texts = load_examples(rule_data["eval"]).texts
    torch.testing.assert_close(batch_logits(reloaded, texts), batch_logits(result.loaded, texts), rtol=0, atol=1e-6)
    # only the adapted projections and the head moved
    before = load_model(word_bert).model.state_dict()
    after = reloaded.model.state_dict()
    layer = "bert.encoder.layer.1.attention.self."
    assert not torch.equal(before[layer + "query.weight"], after[layer + "query.weight"])
    assert not torch.equal(before[layer + "value.weight"], after[layer + "value.weight"])
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert torch.equal(before[layer + "key.weight"], after[layer + "key.weight"])
    assert torch.equal(before["bert.embeddings.word_embeddings.weight"], after["bert.embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("arch, targets, heads", [("bert", ["query", "value"], ["classifier"]),
                                                  ("gpt2", ["c_attn"], ["score"]),
                                                  ("llama", ["q_proj", "v_proj"], ["score"])])
def test_lora_finds_query_value_and_head(arch, targets, heads):
    model = tiny_classifier(arch)
    assert lora_targets(model) == targets
    assert head_modules(model) == heads


# ---------------------------------------------------------------- refusals and atomicity


@pytest.fixture()
def existing_out(tmp_path):
    """A model folder an earlier `train` wrote (the only kind of folder --force may replace)."""
    out = tmp_path / "existing"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious\n")
    (out / "config.json").write_text("{}")
    (out / "training.json").write_text("{}")
    (out / "sub" / "model.bin").write_bytes(bytes(range(256)))
    return out


def _three_classes(tmp_path):
    return {"train_file": write_tsv(tmp_path / "three.tsv", [{"sentence": "good movie", "label": i % 3} for i in range(6)])}


def _unseen_eval_label(tmp_path):
    return {"eval_file": str(write_tsv(tmp_path / "eval.tsv", [{"sentence": "good movie", "label": 0},
                                                                {"sentence": "bad plot", "label": 7}]))}


BAD = {
    "noise-one": (lambda t: {"noise": 1.0}, r"--noise"),
    "noise-negative": (lambda t: {"noise": -0.1}, r"--noise"),
    "epochs-zero": (lambda t: {"epochs": 0}, r"--epochs"),
    "batch-zero": (lambda t: {"batch_size": 0}, r"--batch-size"),
    "lr-zero": (lambda t: {"lr": 0.0}, r"--lr"),
    "lr-negative": (lambda t: {"lr": -1e-3}, r"--lr"),
    "three-classes": (_three_classes, r"3 classes .*head has 2 classes.*--num-labels 3"),
    "unseen-eval-label": (_unseen_eval_label, r"label '7' in row 2 of .*eval\.tsv is not one of the model's labels"),
    "missing-eval": (lambda t: {"eval_file": str(t / "nope.tsv")}, r"eval file .*does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_user_error_and_out_is_untouched(case, word_bert, train_tsv, tmp_path, existing_out):
    make, message = BAD[case]
    options = {"train_file": train_tsv, "epochs": 1, **make(tmp_path)}
    train_file = options.pop("train_file")
    before = snapshot(existing_out)
    with pytest.raises(UserError, match=message) as error:
        train_model(word_bert, train_file, existing_out, force=True, **options)
    assert "\n" not in str(error.value)
    assert snapshot(existing_out) == before and siblings(existing_out) == []


def test_existing_out_needs_force(word_bert, train_tsv, existing_out):
    before = snapshot(existing_out)
    with pytest.raises(UserError, match="already holds a model folder.*--force"):
        train_model(word_bert, train_tsv, existing_out, epochs=1)
    assert snapshot(existing_out) == before
    result = train_model(word_bert, train_tsv, existing_out, epochs=1, force=True)
    assert not (existing_out / "keep.txt").exists() and (result.out / "training.json").is_file()
    assert siblings(existing_out) == []


@pytest.mark.parametrize("stage, error", [("save", KeyboardInterrupt), ("train epoch 1/1", RuntimeError)])
def test_interrupted_run_leaves_out_untouched(word_bert, train_tsv, existing_out, stage, error):
    def progress(name, done, total):
        if name == stage and done == 2:  # for "save": after the model and train_used are written
            raise error("stop")

    before = snapshot(existing_out)
    with pytest.raises(error):
        train_model(word_bert, train_tsv, existing_out, epochs=1, batch_size=2, force=True, progress=progress)
    assert snapshot(existing_out) == before and siblings(existing_out) == []


def test_label_names_name_the_new_head(word_bert, rule_data, tmp_path):
    result = train_model(word_bert, rule_data["train"], tmp_path / "named", epochs=1,
                         label_names="bad,good", **FAST)
    assert load_model(result.out).label2id == {"bad": 0, "good": 1}
    with pytest.raises(UserError, match="2 names but --num-labels is 3"):
        train_model(word_bert, rule_data["train"], tmp_path / "x", label_names="bad,good", num_labels=3)
    assert not (tmp_path / "x").exists()


def test_out_never_replaces_what_is_not_ours(word_bert, train_tsv, tmp_path):
    """A file, a folder of someone else's, the model itself or the data's folder: refused even
    with --force, and left as they were."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("keep me too")
    for out, words in ((a_file, "is a file"), (theirs, "not a lite-influence"), (word_bert, "is or contains"),
                       (train_tsv.parent, "is or contains")):
        with pytest.raises(UserError) as info:
            train_model(word_bert, train_tsv, out, epochs=1, force=True)
        assert words in str(info.value)
    assert a_file.read_text() == "keep me" and (theirs / "thesis.tex").read_text() == "keep me too"
    assert (word_bert / "config.json").is_file() and train_tsv.is_file()
