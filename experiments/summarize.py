"""Prints markdown tables of the results in experiments/results/*.json (for experiments/README.md).

    python experiments/summarize.py [--results DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def ci(x):
    return f"{x['value']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"


def cache_reuse(r):
    print(f"\n### cache_reuse ({r['dataset']}/{r['model']}, N = {r['num_train']}, p = {r['num_params']:,}, "
          f"rtol {r['rtol']:g}, B = {r['bootstrap']})\n")
    print("| seed | solver | C | IF time (s), K=50+100 | CiF time (s) | speedup | Pearson K=50 | Pearson K=100 | "
          "Spearman K=50 | Spearman K=100 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in r["runs"]:
        pk = {y["K"]: y for y in x["per_k"]}
        print(f"| {x.get('seed', r.get('seed'))} | {x['solver']} | {x['C']} | {x['if_seconds_total']:.1f} | {x['cif_seconds_total']:.1f} | "
              f"{x['speedup']:.1f}x | " + " | ".join(ci(pk[k][m]) for m in ("pearson", "spearman") for k in sorted(pk))
              + " |")
    if any("paper" in y for x in r["runs"] for y in x["per_k"]):
        print("\nThe rows above are the corrected estimator (issue #17). The paper's (eq. 11) and the cross-fold "
              "workload (V != S), Pearson / Spearman / median CiF/IF:\n")
        print("| seed | solver | C | K | paper (eq. 11) | cross-fold |")
        print("|---|---|---|---|---|---|")
        for x in r["runs"]:
            for y in x["per_k"]:
                p, c = y["paper"], y["cross_fold"]
                print(f"| {x.get('seed', r.get('seed'))} | {x['solver']} | {x['C']} | {y['K']} | {p['pearson']['value']:.3f} / "
                      f"{p['spearman']['value']:.3f} / {p['median_ratio']:.3f} | {c['pearson']:.3f} / "
                      f"{c['spearman']:.3f} / {c['median_ratio']:.3f} |")


def cache_reuse_summary(r):
    """Mean ± sd over seeds (``cache_reuse`` with several seeds)."""
    if len(r.get("seeds") or []) < 2:
        return
    print(f"\nMean ± sd over seeds {r['seeds']}:\n")
    print("| solver | C | K | speedup | corrected Pearson | corrected Spearman | paper Pearson | paper Spearman | "
          "cross-fold Pearson |")
    print("|---|---|---|---|---|---|---|---|---|")

    def ms(x, digits=3):
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"

    for x in r["summary"]:
        print(f"| {x['solver']} | {x['C']} | {x['K']} | {ms(x['speedup'], 1)}x | {ms(x['corrected_pearson'])} | "
              f"{ms(x['corrected_spearman'])} | {ms(x['paper_pearson'])} | {ms(x['paper_spearman'])} | "
              f"{ms(x['cross_fold_pearson'])} |")


def theorem_bound(r):
    print(f"\n### theorem_bound ({r['dataset']}/{r['model']}, reference IF rtol {r['reference_rtol']:g})\n")
    print("| C | cache rtol | m | measured mean ‖IF−CiF‖ | Thm 3.1 scatter | Thm 3.1 solver | eq. 13 bound (mean) |"
          " relative error |")
    print("|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        for y in x["per_m"]:
            print(f"| {x['C']} | {x['cache_rtol']:g} | {y['m']} | {y['measured_mean']:.3g} | "
                  f"{y['expected_bound_scatter']:.3g} | {y['expected_bound_solver']:.3g} | "
                  f"{y['subset_bound_scatter_mean'] + y['subset_bound_solver_mean']:.3g} | {y['relative_mean']:.3f} |")


def amortisation(r):
    print(f"\n### amortisation ({r['dataset']}/{r['model']}, rtol {r['rtol']:g})\n")
    print("| solver | t_IHVP (s) | C | t_over (s) | C solves (s) | build (s) | t_lin (ms) | paper break-even "
          "C + t_over/t_IHVP | measured Q* |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in r["settings"]:
        for b in s["builds"]:
            print(f"| {s['solver']} | {s['t_ihvp']:.2f} | {b['C']} | {b['t_over']:.1f} | {b['t_solves']:.1f} | "
                  f"{b['build_seconds']:.1f} | {b['t_lin'] * 1e3:.2f} | {b['C'] + s['paper_breakeven_offset']:.1f} | "
                  f"{b['measured_breakeven_Q']:.1f} |")


def system_profile(r):
    print(f"\n### system_profile ({r['dataset']}/{r['model']}, {r['queries']} queries, rtol {r['rtol']:g})\n")
    print("| method | solver | C | storage | overhead (s) | IHVP solves (s) | total build (s) | per query | total (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        if x["method"] == "IF":
            ext = f" (from {x['if_queries_timed']} timed)" if x["extrapolated"] else ""
            print(f"| IF | {x['solver']} | – | 0 | – | – | – | {x['per_query_seconds']:.2f} s | "
                  f"{x['total_seconds']:.1f}{ext} |")
        else:
            print(f"| CiF | {x['solver']} | {x['C']} | {x['storage_bytes'] / 2**20:.2f} MiB | {x['overhead_seconds']:.1f} | "
                  f"{x['solves_seconds']:.1f} | {x['build_seconds']:.1f} | {x['per_query_seconds'] * 1e3:.2f} ms | "
                  f"{x['total_seconds']:.1f} |")


def robustness(r):
    print(f"\n### robustness ({r['dataset']}/{r['model']}; Pearson / Spearman)\n")
    ks = r["K"]
    print("| sketches | d | C | " + " | ".join(f"K={k}" for k in ks) + " | largest cluster |")
    print("|---|---|---|" + "---|" * (len(ks) + 1))
    keys = sorted({(x["normalized"], x["d"], x["C"]) for x in r["cells"]})
    for nz, d, c in keys:
        cells = {x["K"]: x for x in r["cells"] if (x["normalized"], x["d"], x["C"]) == (nz, d, c)}
        share = next(iter(cells.values()))["largest_cluster_share"]
        print(f"| {'unit' if nz else 'raw'} | {d} | {c} | " + " | ".join(
            f"{cells[k]['pearson']['value']:.3f} / {cells[k]['spearman']['value']:.3f}" for k in ks)
              + f" | {share:.0%} |")
    if any("paper" in x for x in r["cells"]):
        print("\nCorrected estimator above (issue #17); the paper's (eq. 11) and the cross-fold workload:\n")
        print("| sketches | d | C | K | paper (eq. 11) | cross-fold |")
        print("|---|---|---|---|---|---|")
        for x in r["cells"]:
            c = x["cross_fold"]
            cross = "–" if not c else f"{c['pearson']:.3f} / {c['spearman']:.3f}"
            print(f"| {'unit' if x['normalized'] else 'raw'} | {x['d']} | {x['C']} | {x['K']} | "
                  f"{x['paper']['pearson']['value']:.3f} / {x['paper']['spearman']['value']:.3f} | {cross} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        fn = globals().get(r.get("experiment", ""))
        if fn is not None:
            fn(r)
            if r["experiment"] == "cache_reuse":
                cache_reuse_summary(r)
            print(f"\n`{r['command']}` — {r['machine']['cpu']}, {r['machine']['cpu_count']} CPUs, jax "
                  f"{r['machine']['jax']}, load {r.get('load_average_1_5_15min_at_end', '?')}")


if __name__ == "__main__":
    main()
