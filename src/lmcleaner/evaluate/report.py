"""Benchmark report: a markdown table plus PNG plots.

Rows are dicts with (at least) the keys of :data:`REPORT_COLUMNS`; any value
may be ``None`` (shown as ``-``, left out of plots). The plots answer the two
questions of DESIGN §3/§4: how the error falls with the window ``K`` for each
method / curvature backend, and what each method's error costs compared with
exact replay.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot,
no global backend switch), so this works headless and inside other programs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPORT_COLUMNS = ["method", "hessian_mode", "K", "rel_param_error", "kl_forget", "kl_retain", "seconds",
                  "grad_equivalents", "cost_vs_replay", "forget_quality", "model_utility", "mia_auc"]
MISSING = "-"


def format_value(value: Any) -> str:
    """Compact cell text: 4 significant digits for floats, ``-`` for missing/NaN."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A column-aligned markdown table (readable in a terminal too).

    ``columns`` defaults to :data:`REPORT_COLUMNS` plus any other keys, in
    first-seen order; columns absent from every row are dropped."""
    if columns is None:
        extra = [k for r in rows for k in r if k not in REPORT_COLUMNS]
        columns = [c for c in REPORT_COLUMNS + list(dict.fromkeys(extra)) if any(c in r for r in rows)]
    columns = list(columns)
    if not columns:
        return ""
    cells = [[format_value(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(_is_number(r.get(c)) or r.get(c) is None for r in rows) and any(_is_number(r.get(c)) for r in rows)
               for c in columns]

    def line(values: Iterable[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(float(value))


def _label(row: Mapping[str, Any]) -> str:
    method = str(row.get("method") or "?")
    mode = row.get("hessian_mode")
    return f"{method} ({mode})" if mode else method


def _metric_title(metric: str) -> str:
    return "Relative parameter error" if metric == "rel_param_error" else metric.replace("_", " ").capitalize()


def _new_figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def _use_log(values: list[float]) -> bool:
    pos = [v for v in values if v > 0]
    return len(pos) == len(values) and len(pos) > 1 and max(pos) / min(pos) > 20


def plot_training_loss(history: Sequence[tuple[float, float]], path: str | Path,
                       title: str = "Training loss") -> Path | None:
    """Loss against optimizer step; ``None`` when there is nothing to plot."""
    pts = [(float(s), float(l)) for s, l in history if _finite(s) and _finite(l)]
    if not pts:
        return None
    fig, ax = _new_figure()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", linewidth=1.2, label="training loss")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token NLL)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_error_vs_k(rows: Sequence[Mapping[str, Any]], path: str | Path,
                    metric: str = "rel_param_error") -> Path | None:
    """``metric`` against window ``K``, one line per (method, hessian_mode); rows
    without ``K`` (replay, rollback, ...) are dashed horizontal references."""
    series: dict[str, list[tuple[float, float]]] = {}
    refs: dict[str, float] = {}
    for r in rows:
        if not _finite(r.get(metric)):
            continue
        if _finite(r.get("K")):
            series.setdefault(_label(r), []).append((float(r["K"]), float(r[metric])))
        else:
            refs.setdefault(_label(r), float(r[metric]))
    if not series:
        return None
    fig, ax = _new_figure()
    all_y = [y for pts in series.values() for _, y in pts] + list(refs.values())
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.5, label=label, color=f"C{i}")
    for j, (label, y) in enumerate(sorted(refs.items())):
        ax.axhline(y, linestyle="--", linewidth=1.0, color=f"C{len(series) + j}", label=f"{label} (no K)")
    if _use_log(all_y):
        ax.set_yscale("log")
    ax.set_title(f"{_metric_title(metric)} vs propagation window K")
    ax.set_xlabel("propagation window K (steps)")
    ax.set_ylabel("relative parameter error to oracle" if metric == "rel_param_error" else metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, Path(path))


def _cost_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
    for key in ("cost_vs_replay", "grad_equivalents", "seconds"):
        if any(_finite(r.get(key)) and float(r[key]) > 0 for r in rows):
            return key
    return None


_COST_LABEL = {"cost_vs_replay": "cost / exact replay (gradient-equivalents, log)",
               "grad_equivalents": "cost (gradient-equivalents, log)", "seconds": "cost (seconds, log)"}
_ERROR_LABEL = {"rel_param_error": "relative parameter error to oracle",
                "kl_forget_ratio": "KL to oracle on forget set / untouched model's"}


def plot_error_vs_cost(rows: Sequence[Mapping[str, Any]], path: str | Path,
                       metrics: Sequence[str] = ("rel_param_error", "kl_forget_ratio"),
                       title: str | None = None) -> Path | None:
    """Error against cost, log x, one panel per error metric present (parameter space and,
    when measured, function space), one colour per method, points labelled with K /
    curvature / window. "Do nothing" (error 1) and exact replay (cost 1, error 0) are marked:
    a useful approximation sits left of the replay line and well below the do-nothing line."""
    cost = _cost_key(rows)
    if cost is None:
        return None
    panels = [m for m in metrics if any(_finite(r.get(m)) and _finite(r.get(cost)) and float(r[cost]) > 0
                                        and r.get("method") not in ("replay", "none") for r in rows)]
    if not panels:
        return None
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    replay = next((r for r in rows if r.get("method") == "replay" and _finite(r.get(cost))), None)
    for ax, metric in zip(axes[0], panels):
        pts = [r for r in rows if _finite(r.get(metric)) and _finite(r.get(cost)) and float(r[cost]) > 0
               and r.get("method") not in ("replay", "none")]
        methods = list(dict.fromkeys(str(r.get("method") or "?") for r in pts))
        for i, method in enumerate(methods):
            mine = [r for r in pts if str(r.get("method") or "?") == method]
            ax.scatter([float(r[cost]) for r in mine], [max(float(r[metric]), 1e-4) for r in mine], s=36,
                       color=f"C{i}", label=method, zorder=3, marker="*" if method == "auto" else "o")
            for r in mine:
                tag = str(r.get("name") or "")
                tag = tag.replace("LMC-sample-", "").replace("LMC-window-", "win-") if tag else ""
                if float(r[metric]) <= 0:
                    tag = f"{tag or method} (exact: 0, drawn at 1e-4)"
                if tag and tag != method:
                    ax.annotate(tag, (float(r[cost]), max(float(r[metric]), 1e-4)), textcoords="offset points",
                                xytext=(4, 3), fontsize=6)
        ax.axhline(1.0, color="grey", ls="--", lw=1, label="do nothing (error 1)")
        if cost == "cost_vs_replay":
            ax.axvline(1.0, color="black", ls=":", lw=1, label="exact replay (error 0)")
        elif replay is not None:
            ax.axvline(float(replay[cost]), color="black", ls=":", lw=1, label="exact replay (error 0)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.set_xlabel(_COST_LABEL[cost])
        ax.set_ylabel(_ERROR_LABEL.get(metric, metric))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(title or "error vs cost", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def _model_label(row: Mapping[str, Any]) -> str:
    return str(row.get("name") or row.get("model") or row.get("method") or "?")


def plot_forget_vs_utility(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Each model as a point: forgetting (forget quality, log; else forget-set answer
    probability) against model utility. Top right is the goal when forget quality is
    plotted (indistinguishable from the oracle, useful); ``None`` without data."""
    xkey = "forget_quality" if any(_finite(r.get("forget_quality")) and float(r["forget_quality"]) > 0
                                   for r in rows) else "forget_prob"
    pts = [r for r in rows if _finite(r.get(xkey)) and _finite(r.get("model_utility"))
           and (xkey != "forget_quality" or float(r[xkey]) > 0)]
    if not pts:
        return None
    fig, ax = _new_figure()
    for i, r in enumerate(pts):
        x, y = float(r[xkey]), float(r["model_utility"])
        ax.scatter([x], [y], s=40, color=f"C{i % 10}", zorder=3)
        ax.annotate(_model_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if xkey == "forget_quality":
        ax.set_xscale("log")
        ax.set_xlabel("forget quality (KS p-value vs the oracle, log; higher = closer to retraining)")
    else:
        ax.set_xlabel("forget-set answer probability (lower = more forgotten)")
    ax.set_ylabel("model utility")
    ax.set_title("Forgetting vs utility, per model")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, Path(path))


_ATTACK_LABELS = {"mia_auc_loss": "LOSS", "mia_auc_zlib": "zlib", "mia_auc_min_k": "Min-K%",
                  "mia_auc_min_k_plus_plus": "Min-K%++"}


def plot_mia_auc(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Membership-inference AUC (forget vs holdout) per model, one bar per attack when the rows
    carry them (else the primary ``mia_auc``); 0.5 = forget looks like unseen data."""
    keys = [k for k in _ATTACK_LABELS if any(_finite(r.get(k)) for r in rows)] or ["mia_auc"]
    models = [r for r in rows if any(_finite(r.get(k)) for k in keys)]
    if not models:
        return None
    fig, ax = _new_figure(max(7.0, 0.9 * len(models) + 2), 4.5)
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(models))]
        ys = [float(r[key]) if _finite(r.get(key)) else math.nan for r in models]
        ax.bar(xs, ys, width=width, color=f"C{j}", label=_ATTACK_LABELS.get(key, "MIA AUC"))
    ax.axhline(0.5, linestyle="--", color="gray", linewidth=1.0, label="chance (0.5)")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([_model_label(r) for r in models], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.18)
    ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("AUC forget (members) vs holdout")
    ax.set_title("Membership inference AUC per model")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=len(keys) + 1, loc="upper center")
    return _save(fig, Path(path))


MODEL_PLOTS = [
    ("forget_vs_utility", "Forgetting vs utility", plot_forget_vs_utility,
     "no model has both a forget metric and model_utility"),
    ("mia_auc", "Membership inference AUC per model", plot_mia_auc, "no model has an MIA AUC"),
]


def write_model_plots(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """The per-model PNG plots (also part of :func:`write_report`); the ones without data are skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, _, draw, _ in MODEL_PLOTS:
        written = draw(rows, out / f"{key}.png")
        if written is not None:
            paths[key] = written
    return paths


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 loss_history: Sequence[tuple[float, float]] | None = None, title: str = "lmcleaner report",
                 notes: str | None = None) -> dict[str, Path]:
    """Write ``report.md`` and the PNG plots to ``out_dir``.

    Returns ``{"report": ..., "training_loss": ..., "error_vs_k": ...,
    "error_vs_cost": ...}`` for the files actually written (a plot with no
    data is skipped and the report says so)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plots = [
        ("training_loss", "Training loss",
         lambda p: plot_training_loss(loss_history or [], p), "no training loss history given"),
        ("error_vs_k", "Error vs window K", lambda p: plot_error_vs_k(rows, p),
         "no row has both K and rel_param_error"),
        ("error_vs_cost", "Error vs cost", lambda p: plot_error_vs_cost(rows, p),
         "no row has both a cost and rel_param_error"),
        *[(key, heading, (lambda p, d=draw: d(rows, p)), why) for key, heading, draw, why in MODEL_PLOTS],
    ]
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## Results", "", format_table(rows) if rows else "_no result rows_", "",
              "`-` = not computed / not applicable. `rel_param_error` = ||theta - theta_oracle|| / "
              "||theta_original - theta_oracle||; `kl_*` = mean next-token KL(oracle || model) on answer tokens; "
              "`cost_vs_replay` = cost relative to exact replay.", "", "## Plots", ""]
    for key, heading, draw, why_missing in plots:
        written = draw(out / f"{key}.png")
        if written is not None:
            paths[key] = written
            lines += [f"### {heading}", "", f"![{heading}]({written.name})", ""]
        else:
            lines += [f"### {heading}", "", f"_not drawn: {why_missing}_", ""]
    report = out / "report.md"
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(report)
    paths["report"] = report
    return paths
