"""The paired difference DPORM - EXRM over preference pairs, per set, for an EXRM vs DPORM spec
that has run (pipelines/exrm_vs_dporm*.yaml): each seed's `exrm_acc` and `dporm_acc`
artifacts (its variant's, with `seeds:`; or stages written per seed, `exrm_acc_sN` and
`dporm_acc_sN`) score the same pairs in the same order, so each pair gives
correct(DPORM) - correct(EXRM) (a tie counts half). Prints, per set, the mean over every pair of
every finished seed and a 95% percentile bootstrap interval (pairs resampled within each seed).

    ALIGNFLOW_HOME=... python scripts/exrm_paired.py pipelines/exrm_vs_dporm_smollm2.yaml
"""
from __future__ import annotations

import re
import sys

import numpy as np
import pyarrow.parquet as pq

from flows.home import store_root
from flows.store import Store
from flows.sweep import expand
from tasks.reward_accuracy import SETS


def correct(chosen, rejected) -> np.ndarray:
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    return (chosen > rejected) + 0.5 * (chosen == rejected)


def result_file(store: Store, recipes: str, node):
    """The stage's pairs.parquet: for the current spec and code, or else as the stage last ran
    (said on stdout: `alignflow plan` tells what changed since); `recipes`: the store's index of
    what the spec's (or its variant's) stages last ran with."""
    for key in (node.key, (store.last_recipe(recipes, node.id) or {}).get("key")):
        path = store.local_root / "reward_accuracy" / str(key) / "pairs.parquet"
        if key and path.is_file():
            if key != node.key:
                print(f"{node.id}: as last run (stale now: `alignflow plan` says why)")
            return path
    return None


def main(spec_file: str, resamples: int = 5000) -> None:
    sweep = expand(spec_file)
    store = Store(store_root(sweep.spec.store))
    diffs: dict[str, list[np.ndarray]] = {s: [] for s in SETS}
    seeds = []
    for variant in sweep.variants:  # a spec with `seeds:`: one per seed; else the spec itself
        nodes = {n.name: n for n in variant.nodes}
        for name in nodes:
            match = re.fullmatch(r"exrm_acc(?:_(s\d+))?", name)
            partner = name.replace("exrm", "dporm", 1) if match else None
            if partner not in nodes:
                continue
            seed = " ".join(x for x in (variant.label, match.group(1)) if x) or name
            paths = [result_file(store, variant.recipes, nodes[n]) for n in (name, partner)]
            if not all(paths):
                print(f"{seed}: {name} or {partner} has not run")
                continue
            exrm, dporm = (pq.read_table(p).to_pydict() for p in paths)
            assert exrm["chosen"] == dporm["chosen"] and exrm["set"] == dporm["set"], "not the same pairs"
            seeds.append(seed)
            sets = np.asarray(exrm["set"])
            d = correct(dporm["dporm_chosen"], dporm["dporm_rejected"]) - correct(exrm["exrm_chosen"], exrm["exrm_rejected"])
            for s in SETS:
                diffs[s].append(d[sets == s])
    rng = np.random.default_rng(0)
    print(f"seeds: {', '.join(seeds) or 'none finished'}")
    for s in SETS:
        if not diffs[s]:
            continue
        mean = np.concatenate(diffs[s]).mean()
        boot = [np.concatenate([g[rng.integers(len(g), size=len(g))] for g in diffs[s]]).mean()
                for _ in range(resamples)]
        low, high = np.percentile(boot, [2.5, 97.5])
        n = sum(map(len, diffs[s]))
        print(f"{s:>15}: DPORM - EXRM {mean:+.3f} [{low:+.3f}, {high:+.3f}] over {n} pairs")


if __name__ == "__main__":
    main(*sys.argv[1:2])
