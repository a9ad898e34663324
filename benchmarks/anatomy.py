"""Anatomy of an old request's deviation, and what cheap carries make of it.

Trains one run of ``benchmarks/fidelity.py``'s regimes (default: ``old``,
pretrained base, AdamW), replays the counterfactual without the forgotten
samples once, and keeps the exact deviation ``d_p = theta'_p - theta_p`` (and
the optimizer-state deviation) at every restore point ``p``. It then reports:

- where ``d_tau`` sits: share per tensor; for the output layer, the share in
  rows of tokens the training data never targets, its rank-one share, the
  sign agreement of those rows, how concentrated its column direction is, and
  the softmax-invariant common shift (one vector added to every row);
- how ``d_p`` develops: norm, cosine to ``d_tau``, output-layer amplitude,
  learning-rate mass since the first use;
- from each window end ``w`` (exact deviation known there), the relative
  parameter error at ``tau`` of gradient-free carries: ``frozen`` (the
  shipped one), ``adam_state`` (AdamW's own map with the gradient held, ``m``
  and ``v`` interpolated between the recorded checkpoints) and
  ``extrapolate`` (the last segment's change per unit of learning rate, kept
  up to ``tau``); and two oracle bounds on predicting the output layer's
  drift: ``frozen_exact_untargeted`` (the frozen carry with the never-targeted
  output rows replaced by their exact ``d_tau``) and ``frozen_exact_head``
  (the whole output layer exact, the body frozen) -- what a perfect
  output-row predictor would reach on top of the frozen body;
- with ``--eos STEPS``: the top Hessian eigenvalues of the step loss at those
  steps (Lanczos), against the stability limit of the optimizer
  (``2 (1 + momentum) / lr`` for SGD with heavy-ball momentum);
- with ``--linearity``: how far a linearisation of the whole training step
  (gradient *and* optimizer map) from a window end ``w`` (after the last use)
  can get, whatever its curvature. The training
  flow ``Phi`` from ``w`` to ``tau`` maps the recorded state to ``theta_tau``
  and the counterfactual one to ``theta'_tau``, so ``d_tau`` is its secant
  ``Phi(theta'_w) - Phi(theta_w)``. Linear propagation computes the tangent
  ``J(theta_w) d_w``; here it is measured by a finite difference of exact
  replays, ``(Phi(theta_w + eps d_w) - Phi(theta_w)) / eps`` (optimizer state
  moved by ``eps`` of its deviation too), and compared with ``d_tau``. The
  same at the counterfactual end (``tangent_at_counterfactual``) and at the
  midpoint ``theta_w + d_w / 2`` (``tangent_at_midpoint``, the second-order
  rule) say whether the failure is curvature of the flow over ``d`` itself.
  ``eps_response`` is the counterfactual tangent's norm over ``||d_tau||``
  (1 for a linear flow; a chaotic one would be far above 1).
  ``linear_propagation`` is what LMCleaner's own linear carry (exact HVPs,
  ``carry=linear``) makes of ``d_w``: for SGD it *is* the tangent at the
  recorded trajectory, for AdamW it evaluates Adam's map exactly on the
  linearised gradient (``unlearn/propagation.py``) and can beat the tangent.
  With ``--block-bound`` also ``block_diagonal_propagation``: the same carry
  with the exact Hessian's cross-tensor blocks zeroed (``BlockDiagonalHVP``,
  registered here as ``hessian_mode=block_diagonal``), at the same curvature
  point. Any per-layer curvature -- K-FAC, EK-FAC, a per-tensor diagonal --
  approximates one of those blocks, so this is the best such a carry can do
  (costs one exact product per tensor and step: a measurement, not a method).

    python benchmarks/anatomy.py --seed 4 --json bench_out/anatomy_adamw_s4.json
    python benchmarks/anatomy.py --optimizer sgd --seed 6 --eos 20,60,120
    python benchmarks/anatomy.py --seed 13 --linearity 20,40 --block-bound

Parameter error only; ``benchmarks/fidelity.py`` gives the function-space
columns of the methods themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # the regimes are defined there

from lmcleaner.config import load_config
from lmcleaner.evaluate import format_table
from lmcleaner.train import Trainer
from lmcleaner.unlearn.hvp import HVPBackend, register_backend
from lmcleaner.unlearn.hvp.exact import ExactHVP
from lmcleaner.unlearn.session import UnlearnSession
from lmcleaner.unlearn.windowed import (
    WindowedReplay,
    norm_params,
    sub_params,
    sub_state,
)

Params = dict[str, torch.Tensor]


def cosine(a: Params, b: Params) -> float:
    dot = sum(float((a[n] * b[n]).sum()) for n in a)
    den = norm_params(a) * norm_params(b)
    return dot / den if den > 0 else float("nan")


def output_layer(params: Params) -> str | None:
    for name in ("lm_head.weight", "model.lm_head.weight"):
        if name in params:
            return name
    return None


def targeted_tokens(dataset, vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab)
    for i in range(len(dataset)):
        lab = torch.as_tensor(dataset[i]["labels"])
        lab = lab[(lab >= 0) & (lab < vocab)]
        counts += torch.bincount(lab, minlength=vocab).float()
    return counts > 0


def anatomy(d: Params, targeted: torch.Tensor | None) -> dict:
    total = norm_params(d) ** 2
    shares = sorted(((n, float((v ** 2).sum()) / total) for n, v in d.items()), key=lambda x: -x[1])
    out: dict = {"norm": math.sqrt(total), "tensor_energy_share": dict(shares[:6])}
    head = output_layer(d)
    if head is None:
        return out
    W = d[head]
    e = float((W ** 2).sum())
    sv = torch.linalg.svdvals(W)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    v = Vh[0] ** 2
    out.update(head_energy_share=e / total, rank1_share=float(S[0] ** 2 / (sv ** 2).sum()),
               common_shift_share=float((W.mean(0) ** 2).sum()) * W.shape[0] / e,
               column_top8_share=float(v.sort(descending=True).values[:8].sum()))
    if targeted is not None:
        un = ~targeted
        rows = (W ** 2).sum(1)
        u = U[:, 0]
        out.update(untargeted_rows=int(un.sum()), vocab=int(W.shape[0]),
                   untargeted_energy_share=float(rows[un].sum()) / e,
                   untargeted_sign_agreement=float((torch.sign(u[un]) == torch.sign(u[un].sum())).float().mean()))
    return out


@register_backend
class BlockDiagonalHVP(HVPBackend):
    """The exact step Hessian with every cross-tensor block zeroed: ``(H v)_T = H_TT v_T`` per
    trainable tensor ``T``. The k directions times the tensors are multiplied in one batched
    exact product; the cost is counted as that many exact directions."""

    name = "block_diagonal"
    evaluates_where_asked = True

    def __init__(self, fl) -> None:
        super().__init__()
        self.fl, self.exact = fl, ExactHVP(fl)

    @classmethod
    def build(cls, fl, *, diag_provider=None, **options):
        return cls(fl)

    @property
    def cost_in_grads(self) -> float:  # type: ignore[override]
        return self.exact.vectors * self.exact.cost_in_grads / max(self.vectors, 1)

    def _hvp(self, params, batches, normaliser, vectors, step):
        names = list(vectors)
        k = next(iter(vectors.values())).shape[0]
        # direction (i, T): direction i restricted to tensor T
        spread = {n: v.new_zeros((k * len(names), *v.shape[1:])) for n, v in vectors.items()}
        for j, n in enumerate(names):
            spread[n][j * k:(j + 1) * k] = vectors[n]
        products = self.exact.hvp(params, batches, normaliser, spread, step=step)
        return {n: products[n][j * k:(j + 1) * k] for j, n in enumerate(names)}


def carry_errors(session, exact: dict[int, tuple[Params, dict]], pts: list[int], first: int, tau: int,
                 head: str | None = None, targeted: torch.Tensor | None = None) -> list[dict]:
    log, spec = session.log, session.spec
    adam = spec.name.lower() == "adamw"
    d_tau = exact[tau][0]
    n_tau = norm_params(d_tau)
    states = {p: session.replayer.state_at(p)[1] for p in pts} if adam else {}
    group = {n: gi for gi, g in enumerate(spec.groups) for n in g.names}
    b1, b2 = spec.betas

    def interp(step: int, key: str, name: str) -> torch.Tensor:
        lo = max(p for p in pts if p <= step)
        hi = min((p for p in pts if p >= step), default=lo)
        x0 = states[lo][name][key].double()
        if hi == lo:
            return x0
        x1, a = states[hi][name][key].double(), (step - lo) / (hi - lo)
        if key == "exp_avg_sq":  # geometric: v moves by factors
            return torch.exp((1 - a) * x0.clamp_min(1e-30).log() + a * x1.clamp_min(1e-30).log())
        return (1 - a) * x0 + a * x1

    def frozen(w: int) -> Params:
        d = {n: v.clone() for n, v in exact[w][0].items()}
        for s in range(w, tau):
            rec = log.record(s)
            for n in d:
                g = group.get(n, 0)
                d[n].mul_(1 - float(rec.lrs[g]) * float(spec.groups[g].weight_decay))
        return d

    def adam_state(w: int) -> Params:
        d = {n: v.clone() for n, v in exact[w][0].items()}
        dm = {n: st["exp_avg"] for n, st in exact[w][1].items() if "exp_avg" in st}
        dv = {n: st["exp_avg_sq"] for n, st in exact[w][1].items() if "exp_avg_sq" in st}
        step0 = {n: float(states[pts[0]][n]["step"]) - pts[0] for n in dm}
        for s in range(w, tau):
            rec, k = log.record(s), s - w
            for n in d:
                g = group.get(n, 0)
                eta, wd = float(rec.lrs[g]), float(spec.groups[g].weight_decay)
                d[n].mul_(1 - eta * wd)
                if n not in dm:
                    continue
                m, v = interp(s + 1, "exp_avg", n), interp(s + 1, "exp_avg_sq", n)
                count = step0[n] + s + 1
                bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
                m2, v2 = m + dm[n] * b1 ** (k + 1), (v + dv[n] * b2 ** (k + 1)).clamp_min(0)
                d[n] -= eta * (m2 / bc1 / ((v2 / bc2).sqrt() + spec.eps) - m / bc1 / ((v / bc2).sqrt() + spec.eps))
        return d

    def extrapolate(w: int) -> Params | None:
        before = max((p for p in [first, *pts] if p < w), default=None)
        if before is None or before == first:
            return None  # the first segment holds the injection itself: no rate to carry
        m = log.lr_mass(before, w)
        d0, d1 = exact[before][0], exact[w][0]
        rest = log.lr_mass(w, tau)
        return {n: d1[n] + (d1[n] - d0[n]) * rest / m for n in d1} if m > 0 else None

    def with_exact_head(d: Params, rows: torch.Tensor | None) -> Params:
        """``d`` with the output layer's ``rows`` (all when ``None``) replaced by the exact ``d_tau``."""
        h = d[head].clone()
        if rows is None:
            rows = slice(None)
        h[rows] = d_tau[head][rows].to(h.dtype)
        return {**d, head: h}

    rows = []
    for w in pts:
        if w >= tau:
            continue
        row = {"w": w, "cost_vs_replay": (w - first) / (tau - first)}
        for name, fn in (("frozen", frozen), ("adam_state", adam_state if adam else None),
                         ("extrapolate", extrapolate)):
            pred = fn(w) if fn is not None else None
            row[name] = norm_params(sub_params(pred, d_tau)) / n_tau if pred is not None else None
        if head is not None:
            held = frozen(w)
            if targeted is not None:
                row["frozen_exact_untargeted"] = norm_params(sub_params(with_exact_head(held, ~targeted), d_tau)) / n_tau
            row["frozen_exact_head"] = norm_params(sub_params(with_exact_head(held, None), d_tau)) / n_tau
        rows.append(row)
    return rows


def linearity(session, ids: list[int], exact_states: dict[int, tuple[tuple, tuple]], ws: list[int],
              eps: float, block_bound: bool = False) -> list[dict]:
    """Finite-difference tangents of the exact training flow from each ``w`` to ``tau`` along the
    exact deviation (see the module docstring). ``exact_states[p] = ((theta'_p, opt'_p), (theta_p, opt_p))``.

    Every state replayed is ``(theta_w, opt_w) + a (d_w, D_w)`` with ``0 <= a <= 1``: a convex
    combination of the recorded and the counterfactual state, so AdamW's ``v`` stays >= 0 (a step
    outside can make it negative where only the removed samples had a gradient)."""
    rep, tau = session.replayer, session.tau
    (cf_tau, _), (theta_tau, _) = exact_states[tau]
    d_tau = sub_params(cf_tau, theta_tau)
    n_tau = norm_params(d_tau)
    rows = []
    for w in ws:
        (cf, cf_opt), (theta, opt) = exact_states[w]
        d, D = sub_params(cf, theta), sub_state(cf_opt, opt)

        def flow(a: float, w=w, theta=theta, opt=opt, d=d, D=D) -> Params:
            if a == 0.0:
                return theta_tau
            if a == 1.0:
                return cf_tau
            rep.seek(w)
            rep.load_state({n: theta[n] + a * d[n] for n in theta},
                           {n: {k: (v + a * D[n][k] if k in D.get(n, {}) and k != "step" else v)
                                for k, v in st.items()} for n, st in opt.items()})
            return rep.continue_without(ids, tau)[0]

        row: dict = {"w": w}
        # what LMCleaner's linear carry (exact HVPs) makes of the same deviation
        carried, _ = WindowedReplay(carry="linear").carry_between(session, d, D, w, tau)
        row["linear_propagation"] = norm_params(sub_params(carried, d_tau)) / n_tau
        if block_bound:
            carried, _ = WindowedReplay(carry="linear", carry_hessian_mode="block_diagonal").carry_between(
                session, d, D, w, tau)
            row["block_diagonal_propagation"] = norm_params(sub_params(carried, d_tau)) / n_tau
        for name, lo, hi in (("tangent_at_recorded", 0.0, eps), ("tangent_at_midpoint", 0.5 - eps / 2, 0.5 + eps / 2),
                             ("tangent_at_counterfactual", 1.0 - eps, 1.0)):
            a, b = flow(lo), flow(hi)
            tangent = {n: (b[n] - a[n]) / eps for n in b}
            row[name] = norm_params(sub_params(tangent, d_tau)) / n_tau
            if name == "tangent_at_counterfactual":
                row["eps_response"] = norm_params(tangent) / n_tau
        rows.append(row)
    return rows


def eos(session, steps: list[int]) -> list[dict]:
    from lmcleaner.unlearn.functional import FunctionalLM
    from lmcleaner.unlearn.hvp import make_hvp_backend
    from lmcleaner.unlearn.lanczos import top_eigenpairs

    rep, log, spec = session.replayer, session.log, session.spec
    theta0, _ = rep.state_at(steps[0])
    fl = FunctionalLM(session.template, list(theta0), router=session.router_aux)
    hvp = make_hvp_backend("exact", fl, None)
    limit = 2 * (1 + spec.momentum) if spec.name.lower() == "sgd" else None
    out = []
    with fl.curvature_mode():
        for p in steps:
            theta, _ = rep.state_at(p)
            rec = log.record(p)
            batches = rep._all_batches(rec)
            def matvec(V, theta=theta, batches=batches, rec=rec):
                return hvp.hvp(theta, batches, rec.normaliser, V)

            ev, _ = top_eigenpairs(matvec, theta, 2, iters=12, which="LA")
            lam, eta = float(ev.max()), float(rec.lrs[0])
            out.append({"step": p, "lr": eta, "top_eigenvalue": lam, "lr_x_eigenvalue": eta * lam,
                        "stability_limit": limit})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fidelity.add_regime_args(ap)
    ap.add_argument("--eos", default="", help="comma list of steps: top Hessian eigenvalues there")
    ap.add_argument("--linearity", default="", help="comma list of window ends after the last use: finite-difference "
                    "tangents of the exact flow to tau (4 replays each)")
    ap.add_argument("--fd-eps", type=float, default=0.02, help="--linearity: finite-difference step (fraction of d_w)")
    ap.add_argument("--block-bound", action="store_true", help="--linearity: also the linear carry with per-tensor "
                    "(block-diagonal) exact curvature, the bound of any per-layer approximation such as K-FAC")
    ap.add_argument("--json", default="bench_out/anatomy.json")
    args = fidelity.parse_regime_args(ap)
    if args.block_bound and not args.linearity:
        ap.error("--block-bound needs --linearity W,.. (the window ends to carry from)")
    if not 0 < args.fd_eps <= 1:
        ap.error(f"--fd-eps {args.fd_eps}: use a fraction of d_w in (0, 1]")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides, _, _ = fidelity.regime_config(args, run_dir)
        trainer = Trainer(load_config(overrides=overrides))
        trainer.train()
        ids = fidelity.pick_forget(trainer, args)
        session = UnlearnSession(run_dir)
        rep, log, tau = session.replayer, session.log, session.tau
        uses = session.steps_for(ids)
        first = uses[0]
        pts = sorted({p.step for p in log.restore_points if first < p.step < tau} | {tau})
        lin_ws = [int(w) for w in args.linearity.split(",") if w]
        bad = [w for w in lin_ws if w not in pts or w <= uses[-1]]
        if bad:
            ap.error(f"--linearity: {bad} are not restore points after the last use {uses[-1]}; use some of {pts[:-1]}")
        exact: dict[int, tuple[Params, dict]] = {}
        states: dict[int, tuple[tuple, tuple]] = {}
        rep.seek(first)
        for p, (cf, cf_opt), (theta, opt) in rep.counterfactual_stops(ids, pts):
            exact[p] = (sub_params(cf, theta), sub_state(cf_opt, opt))
            if p in lin_ws or p == tau:
                states[p] = ((cf, cf_opt), (theta, opt))
        d_tau = exact[tau][0]
        head = output_layer(d_tau)
        targeted = targeted_tokens(trainer.dataset, d_tau[head].shape[0]) if head else None
        where = anatomy(d_tau, targeted)
        develop = []
        for p in pts:
            d = exact[p][0]
            row = {"step": p, "norm": norm_params(d), "cos_to_final": cosine(d, d_tau),
                   "lr_mass_since_use": log.lr_mass(first, p)}
            if head:
                row["head_amplitude"] = float(torch.linalg.svdvals(d[head])[0])
            develop.append(row)
        carries = carry_errors(session, exact, pts, first, tau, head, targeted)
        eig = eos(session, [int(s) for s in args.eos.split(",") if s]) if args.eos else []
        lin = linearity(session, ids, states, lin_ws, args.fd_eps, args.block_bound) if lin_ws else []
    print(json.dumps(where, indent=1))
    print(format_table(develop))
    print(format_table(carries))
    if eig:
        print(format_table(eig))
    if lin:
        print(format_table(lin))
    print(f"regime={args.regime} init={args.init} optimizer={args.optimizer} clip={args.clip} seed={args.seed} "
          f"uses={uses} tau={tau}")
    out = {"args": {k: v for k, v in vars(args).items() if k != "overrides"}, "uses": uses, "anatomy": where,
           "development": develop, "carries": carries, "eigenvalues": eig,
           "linearity": lin}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
