"""Does dividing a sketch's inner products by the EXACT gradient norms (instead of the sketch's
own norms) bring its cosine NDR closer to exact cosine? Reads a finished ``ndr_sst2.py`` run
folder (its exact stage and dot indexes, kept with ``--work-dir --keep-work``) and prints NDR@30
per scope for both normalisations beside exact gradients; results/exact_norm_cosine.md.

    python benchmarks/exact_norm_cosine.py /tmp/ndr_work/full-s0 pca,random
"""
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ndr_sst2 as B  # noqa
import lite_influence
from lite_influence.audit import noise_flags
from lite_influence.data import load_examples

run = Path(sys.argv[1])
seed = int(run.name.split("-s")[1])
exact = pickle.load(open(run / "stage-exact.pkl", "rb"))
queries = load_examples(run.parent / f"queries-s{seed}.tsv")
out = {}
for projection in sys.argv[2].split(","):
    index = lite_influence.InfluenceIndex.open(run / f"index-dot-{projection}")
    noisy = noise_flags(index.examples, None)
    grads = index.gradients(queries.texts, labels=[index.manifest["label_names"][l] if isinstance(l, int) else l
                                                   for l in queries.labels])
    layers = list(index.layers)
    scopes = {name: [name] for name in layers}
    scopes.update(dict(index.groups))
    subsets = {"all": np.ones(len(exact["correct"]), bool), "correct": exact["correct"]}
    proj_cos, en_cos, ex_cos = {}, {}, {}
    for layer in layers:
        view = index.store.layer(layer)
        q = grads.vectors[layer]
        P = view.scores(view.prepare(q, "dot"), "dot").T  # (Q, N)
        qn = np.sqrt(np.maximum(view_sq := (q.norms() ** 2 if hasattr(q, "norms") and not isinstance(q, np.ndarray)
                                            else (np.asarray(q, np.float64) ** 2).sum(1)), 0))
        tn = view.norms()
        proj_cos[layer] = P / np.outer(np.where(qn > 0, qn, 1), np.where(tn > 0, tn, 1))
        eq, et = np.sqrt(exact["query_sq"][layer]), np.sqrt(exact["train_sq"][layer])
        en_cos[layer] = P / np.outer(eq, et)
        ex_cos[layer] = exact["scores"][layer] / np.outer(eq, et)
    rows = {}
    for name, full in (("proj-norm", proj_cos), ("exact-norm", en_cos), ("exact", ex_cos)):
        rows[name], _ = B.exact_rows(full, scopes, subsets, noisy)
    print(f"== {run.name} {projection}: NDR@30 cosine (mean / rank / vote)")
    for scope in scopes:
        cells = []
        for name in rows:
            cells.append("/".join(f"{rows[name][scope][a]['ndr@30']:.3f}" for a in ("mean", "rank", "vote")))
        print(f"{scope:11s} " + "   ".join(f"{n}={c}" for n, c in zip(rows, cells)))
    out[projection] = rows
pickle.dump(out, open(run / f"en_check.pkl", "wb"))
