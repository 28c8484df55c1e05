"""One table of the projection candidates from the two attribution benchmarks' results.

Reads results/planted_backdoor.json (share of planted examples among the top-P proponents,
cosine, aggregated over queries) and results/fidelity.json (Spearman of projected vs exact
pairwise influence) and writes results/projection_candidates.md: per candidate its dims per
block, the planted share per group for each setup, the worst gap to random 16x16 over the
groups early/middle/late/all (the goal of issue 14: >= -0.05) and the worst block's Spearman
(goal: >= 0.95 with dot). No model is loaded; rerun after either benchmark.

    python benchmarks/candidates_table.py
    python benchmarks/candidates_table.py --planted /tmp/pb/planted_backdoor.json --out results/other.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("early", "middle", "late", "all")
REFERENCE = "random k=16"


def planted_cells(result: dict, source: str, metric: str = "cosine") -> tuple[list[str], float | None]:
    """The group cells of one setup and the worst gap to the reference (None if absent)."""
    by = result["share"][metric].get(source)
    ref = result["share"][metric].get(REFERENCE)
    if by is None:
        return ["-"] * (len(GROUPS) + 1), None
    cells = [f"{by['embeddings']['aggregated']:.2f}"] + [f"{by[g]['aggregated']:.2f}" if g in by else "-" for g in GROUPS]
    gaps = [by[g]["aggregated"] - ref[g]["aggregated"] for g in GROUPS if g in by and ref and g in ref]
    return cells, (min(gaps) if gaps else None)


def fidelity_cells(fidelity: dict, source: str) -> list[str]:
    r = fidelity.get("candidates", {}).get(source)
    if source == "default":  # the library default: its row in fidelity.py's results
        from lite_influence.config import BuildConfig

        d = BuildConfig().validate()
        if d.projection == "mixed":  # sketches.py's name for it
            r = fidelity.get("candidates", {}).get(f"random x pca k={d.proj_dim_in}x{d.proj_dim}")
        else:
            r = {m: fidelity["spearman"][m][d.projection][str(d.proj_dim)] for m in ("dot", "cosine")}
    if r is None:
        return ["-", "-"]
    cells = []
    for metric in ("dot", "cosine"):
        blocks = [v for n, v in r[metric].items() if n.startswith("block")]
        cells.append(f"{min(blocks):.3f}" if blocks else f"emb {r[metric].get('embeddings', float('nan')):.3f}")
    return cells


def markdown(planted: dict, fidelity: dict) -> str:
    results = planted["results"]
    setups = [f"P={r['setup']['p']} pos={r['setup']['positions']} (ASR {r['asr']:.2f})" for r in results]
    sources = [s for s in results[0]["share"]["cosine"] if s != "exact"]
    head = ["candidate", "dims/block"] + [f"{s}: emb/early/mid/late/all" for s in setups] + \
        ["worst gap vs random k=16", "min block Spearman dot", "min block Spearman cosine"]
    lines = ["# Projection candidates: planted causes and fidelity", "",
             "Planted share: cosine, aggregated over queries (benchmarks/planted_backdoor.py); "
             "Spearman: worst block (embeddings for tokens-exact rows), benchmarks/fidelity.py. "
             "Goals (issue 14): gap >= -0.05 on every group, Spearman dot >= 0.95.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    exact = ["/".join(planted_cells(r, "exact")[0]) for r in results]
    lines.append("| exact | - | " + " | ".join(exact) + " | | | |")
    for source in sources:
        dims = results[0]["dims"].get(source, {})
        row, worst = [], []
        for r in results:
            cells, gap = planted_cells(r, source)
            row.append("/".join(cells))
            if gap is not None:
                worst.append(gap)
        gap = f"{min(worst):+.3f}" if worst and dims.get("block0") else "-"
        lines.append(f"| {source} | {dims.get('block0', dims.get('embeddings', '-'))} | " + " | ".join(row)
                     + f" | {gap} | " + " | ".join(fidelity_cells(fidelity, source)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planted", type=Path, default=RESULTS / "planted_backdoor.json")
    parser.add_argument("--fidelity", type=Path, default=RESULTS / "fidelity.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "projection_candidates.md")
    args = parser.parse_args()
    text = markdown(json.loads(args.planted.read_text()), json.loads(args.fidelity.read_text()))
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
