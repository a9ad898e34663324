"""The regime table: ``benchmarks/fidelity.py`` over regimes x inits x optimizers, one summary.

Each setting runs in its own process (``fidelity.py``, JSON + PNG per setting);
this script then writes ``regimes.json``, a markdown table (best row per
family and setting: the cheapest row whose parameter error is <= 0.3 and KL
ratio <= 0.3, and auto's row) and ``regimes.png`` (error against cost, one
panel per setting).

    python benchmarks/regimes.py --out bench_out/regimes --seeds 1
    python benchmarks/regimes.py --only old:pretrained:adamw:0 --seeds 1,2

Settings are ``regime:init:optimizer:clip``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT = ["old:pretrained:adamw:0", "old:pretrained:sgd:0", "old:pretrained:adamw:1.0",
           "recent:pretrained:adamw:0", "recurring:pretrained:adamw:0", "recurring:pretrained:sgd:1.0",
           "old:scratch:adamw:0"]


def run_one(setting: str, seed: int, out: Path, extra: list[str]) -> Path:
    regime, init, opt, clip = setting.split(":")
    path = out / f"{regime}_{init}_{opt}_clip{clip}_seed{seed}.json"
    if path.is_file():
        return path
    cmd = [sys.executable, str(Path(__file__).with_name("fidelity.py")), "--regime", regime, "--init", init,
           "--optimizer", opt, "--clip", clip, "--seed", str(seed), "--json", str(path), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return path


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for res in results:
        setting = f"{res['regime']}/{res['init']}/{res['optimizer']}/clip{res['clip']}/s{res['seed']}"
        by = {r["name"]: r for r in res["rows"]}
        good = [r for r in res["rows"] if r["method"] not in ("none", "replay", "auto")
                and r["rel_param_error"] <= 0.3 and (r["kl_forget_ratio"] or 0) <= 0.3]
        best = min(good, key=lambda r: r["cost_vs_replay"] or 1e9) if good else None
        auto = by.get("auto")
        rows.append({
            "setting": setting, "uses": res.get("uses"),
            "best_approx": best["name"] if best else "none",
            "best_param_error": best["rel_param_error"] if best else None,
            "best_kl_ratio": best["kl_forget_ratio"] if best else None,
            "best_cost_vs_replay": best["cost_vs_replay"] if best else None,
            "auto_chose": auto.get("chosen") if auto else None,
            "auto_param_error": auto["rel_param_error"] if auto else None,
            "auto_cost_vs_replay": auto["cost_vs_replay"] if auto else None,
            "worse_than_nothing": sorted(r["name"] for r in res["rows"] if r["method"] != "none" and (
                r["rel_param_error"] > 1 or (r["kl_forget_ratio"] or 0) > 1)),
        })
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4 * rows_n), squeeze=False)
    for ax, res in zip(axes.flat, results):
        for r in res["rows"]:
            if r["method"] in ("none", "replay"):
                continue
            x = max(r["cost_vs_replay"] or 1e-3, 1e-3)
            marker = "*" if r["method"] == "auto" else "o"
            ax.scatter(x, max(r["rel_param_error"], 1e-3), s=40 if marker == "*" else 16, marker=marker)
            ax.annotate(r["name"].replace("LMC-", ""), (x, max(r["rel_param_error"], 1e-3)), fontsize=5,
                        xytext=(2, 2), textcoords="offset points")
        ax.axhline(1.0, color="grey", ls="--", lw=1, label="do nothing")
        ax.axvline(1.0, color="black", ls=":", lw=1, label="exact replay")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{res['regime']} / {res['init']} / {res['optimizer']} clip {res['clip']} (seed {res['seed']})",
                     fontsize=8)
        ax.set_xlabel("cost / replay (gradient-equivalents)", fontsize=7)
        ax.set_ylabel("relative parameter error", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/regimes")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--only", default=",".join(DEFAULT), help="comma list of regime:init:optimizer:clip")
    ap.add_argument("extra", nargs="*", help="passed to fidelity.py (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [run_one(s, int(seed), out, args.extra) for s in args.only.split(",") for seed in args.seeds.split(",")]
    results = [json.loads(p.read_text()) for p in paths]
    rows = summarise(results)
    from lmcleaner.evaluate import format_table

    table = format_table(rows)
    print(table)
    (out / "regimes.json").write_text(json.dumps({"rows": rows, "runs": [str(p) for p in paths]}, indent=2))
    (out / "regimes.md").write_text(table + "\n")
    plot(results, out / "regimes.png")
    print(f"wrote {out / 'regimes.json'}, regimes.md and regimes.png")


if __name__ == "__main__":
    main()
