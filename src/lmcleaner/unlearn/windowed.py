"""LMCleaner with exact replay inside the window (``propagation=replay``).

Why. The linear propagation (``unlearn.propagation``) pays, per propagated
step, a replayed step to recover ``theta_s`` *and* a Hessian-vector product
(2-2.5 gradients), and it linearises the step. Inside the window the exact
answer is cheaper: replay the window's steps without the forgotten samples,
one gradient per step and no linearisation error. Only what lies beyond the
window is approximated.

The deviation. For a request ``Z`` with uses at steps ``t_1 < t_2 < ...``,
the counterfactual run ``theta'`` differs from the recorded ``theta`` from
``t_1`` on. Write ``d_s = theta'_s - theta_s`` and ``D_s`` for the optimizer
state deviation (AdamW ``m, v``; SGD momentum ``b``).

Windows. From a use ``t``, the engine is brought to ``theta_t`` (nearest
restore point + exact replay), the carried deviation ``(d_t, D_t)`` is added
to parameters and optimizer state, and the recorded steps ``t .. w - 1`` are
replayed with ``Z`` excluded (normalisers recomputed): that is the
counterfactual itself. ``w`` is the first *restore point* at or after
``t + K`` (or ``tau``), because the recorded ``theta_w`` is then read from
disk, not replayed: a window costs its own steps only. Uses inside a window
are covered by it; a later use opens a new window.

Adaptive window (``tol > 0``). A window is extended restore point by
restore point while the deviation is still changing: with ``delta_j =
||d_{w_j} - d_{w_{j-1}}|| / ||d_{w_j}||`` over a segment whose learning-rate
mass is ``M_j = sum eta_s``, the change still to come is estimated as
``delta_j * M_rest / M_j`` (the deviation moves in proportion to the steps
taken); the window stops when that is ``<= tol``. This is the adaptive ``K``:
short where training has settled the deviation, long where it has not.

Carry (``carry``), from a window's end ``w`` to the next use or ``tau``:

- ``frozen``: ``d`` is kept except for decoupled weight decay
  (``d <- (1 - eta wd) d``, exact and free); ``D`` decays as the real state
  does with no further gradient difference (``m: beta1^n``, ``v: beta2^n``,
  momentum ``mu^n``).
- ``momentum``: ``frozen`` plus what the optimizer-state deviation still does
  to the parameters: AdamW ``d -= eta_k dm_k / bc1 / (sqrt(v / bc2) + eps)``
  with ``dm_k = beta1^k dm_w`` and ``v`` held at its window-end value; SGD
  ``d -= eta_k mu^k b_w``. No model evaluation.
- ``linear``: the linear propagation (``propagate``) from ``(d_w, D_w)`` with
  ``carry_hessian_mode`` curvature over the remaining steps (a replayed step
  plus a curvature product per step: the accurate and expensive carry). The
  curvature is taken where ``default_curvature_point`` says (the midpoint
  ``theta + D/2`` under AdamW or clipping with exact/GGN curvature).

Estimated error (``estimated_error`` in the result): ``0`` when the last
window reaches ``tau``; else the change-rate extrapolation above from the last
two measured deviations of the window (or, when the window holds a single
restore point, the deviation at the window start, ``d = 0``, which makes the
estimate conservative: ``M_rest / M_window``), summed over the carries that
do not reach ``tau`` exactly. Relative to ``||d||``, i.e. an estimate of the
relative parameter error ``||theta_hat - theta_re|| / ||theta - theta_re||``.
That rule describes a carry that holds ``d``; a ``linear`` carry moves it, so
its estimate is measured instead: the carry's deviation at the restore points
after the window's end ``w`` within a quarter of the carry's steps (at least
the first) against the exact counterfactual continued from ``w`` (one more
replayed step per step), and the relative error ``e_p`` at the last of them,
``p``, scaled by the learning rate of the whole carry over that of the probed
span, ``e_p M(w, end) / M(w, p)`` (linearisation error accumulates as training
moves; the linear method's probe rule). One segment alone was measured to be
a poor guide: the error grows unevenly (0.0008 over the first six steps after
a window, 0.012 over the next six, on the micro model). A carry with no
restore point inside it keeps the window's rule.

Function-space check (``function_check`` in the result), when a carry reaches
``tau``: on the forgotten rows, ``A = KL(answer || untouched)`` at ``tau``
against ``B = KL(theta'_w || theta_w)`` at the last window's end; ``A > 4 B``
flags the result as farther from retraining than doing nothing (see
``WindowedReplay._function_check``). Parameter error alone missed such a
result (error 0.09, KL ratio 12.9).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .functional import Params

CARRIES = ("frozen", "momentum", "linear")
OptState = dict[str, dict[str, torch.Tensor]]


def sub_params(a: Params, b: Params) -> Params:
    return {n: a[n].double() - b[n].double() for n in a}


def norm_params(x: Params) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in x.values()))


def sub_state(a: OptState, b: OptState) -> OptState:
    out: OptState = {}
    for n, st in a.items():
        out[n] = {k: v.double() - b[n][k].double() for k, v in st.items()
                  if torch.is_tensor(v) and k != "step" and k in b.get(n, {})}
    return out


def _state_add(base: OptState, delta: OptState, betas: tuple[float, float] | None) -> OptState:
    from .methods import _consistent_second_moment

    out: OptState = {}
    for n, st in base.items():
        dst = delta.get(n, {})
        new = {k: ((v.double() + dst[k]).to(v.dtype) if (torch.is_tensor(v) and k in dst) else v)
               for k, v in st.items()}
        if "exp_avg_sq" in dst:
            new["exp_avg_sq"] = _consistent_second_moment(new["exp_avg_sq"], new.get("exp_avg"), betas)
        out[n] = new
    return out


def probe_errors(rep, ids: list[int], predicted: dict[int, Params]) -> list[list]:
    """``[[p, e_p], ...]``: the relative error of each predicted deviation ``predicted[p]`` against
    the exact counterfactual, replayed without ``ids`` from the engine's current state (the caller
    seeks and loads it) through the probe steps ``p`` in order (one gradient per step)."""
    errors = []
    for p, (cf, _), (theta_p, _) in rep.counterfactual_stops(ids, sorted(predicted)):
        exact = sub_params(cf, theta_p)
        den = norm_params(exact)
        errors.append([p, norm_params(sub_params(predicted[p], exact)) / den if den > 0 else 0.0])
    return errors


def extrapolated_error(log, start: int, probe: int, end: int, e: float) -> float:
    """A probe's error ``e`` over ``start..probe`` grown to ``end`` by learning-rate mass
    (linearisation error accumulates as training moves)."""
    seen = log.lr_mass(start, probe)
    return e * log.lr_mass(start, end) / seen if seen > 0 else e


def window_boundary(log, at_least: int, tau: int) -> int:
    """The first restore point ``>= at_least`` whose state is on disk as it is (else ``tau``):
    a window ending there reads the recorded ``theta`` instead of replaying it."""
    for p in sorted(pt.step for pt in log.restore_points):
        if at_least <= p < tau and log.restore_point_for(p).step == p:
            return p
    return tau


class WindowedReplay:
    """Sample-level correction with exact windows and a carry; see the module docstring."""

    def __init__(self, K: int = 50, tol: float = 0.0, carry: str = "frozen", carry_hessian_mode: str = "exact",
                 damping: float = 0.0, max_window: int | None = None) -> None:
        if K < 1:
            raise ValueError(f"K={K}: the replayed window must be >= 1 step")
        if carry not in CARRIES:
            raise ValueError(f"unknown carry {carry!r}; use one of {CARRIES}")
        if tol < 0:
            raise ValueError(f"tol={tol} must be >= 0 (0: fixed windows of K steps)")
        self.K, self.tol, self.carry, self.carry_hessian_mode = K, tol, carry, carry_hessian_mode
        self.damping, self.max_window = damping, max_window
        self._ids: list[int] = []
        self._exact_at: tuple[int, Params, OptState] | None = None  # (step, exact theta', opt') of a window's end

    # ------------------------------------------------------------- run
    def compute(self, session, ids: list[int]) -> tuple[Params, OptState | None, dict[str, Any]]:
        t0 = time.perf_counter()
        rep, log, tau, spec = session.replayer, session.log, session.tau, session.spec
        uses = session.steps_for(ids)
        steps_before = rep.steps_run
        windows: list[dict[str, Any]] = []
        self._carry_log: list[dict[str, Any]] = []
        # (step, theta', opt'): the exact counterfactual at the first window's end, from which exact
        # replay can continue if the approximation is rejected (``auto``) instead of starting over
        self.exact_state: tuple[int, Params, OptState] | None = None
        d: Params | None = None
        D: OptState | None = None
        pos, i, est = uses[0], 0, 0.0
        # the exact counterfactual at the last window's end, from which a linear carry's estimate
        # is measured (``_carry_linear``)
        self._ids, self._exact_at = list(ids), None
        e_window = 0.0
        betas = tuple(spec.betas) if spec.name.lower() == "adamw" else None
        while i < len(uses):
            t = uses[i]
            if d is not None and pos < t:
                d, D = self._carry(session, d, D, pos, t)
                est += self._carry_estimate(e_window)
            rep.seek(t)
            if d is not None:  # the counterfactual so far: the recorded state plus the carried deviation
                theta_t, opt_t = rep.state_at(t)
                rep.load_state({n: (theta_t[n].double() + d[n]).to(theta_t[n].dtype) for n in theta_t},
                               _state_add(opt_t, D, betas) if D else None)
            window, prev, e_window = {"start": t, "segments": []}, d, 0.0
            limit = self.max_window if self.max_window is not None else tau
            # the window runs to a restore point at or after t + K (later uses inside it are covered:
            # Z is excluded at every step), then grows restore point by restore point while it must
            for end, (cf_theta, cf_opt), (theta_w, opt_w) in rep.counterfactual_stops(ids, self._ends(log, t, tau)):
                d, D = sub_params(cf_theta, theta_w), sub_state(cf_opt, opt_w)
                window["end"] = end
                nd = norm_params(d)
                if end >= tau:
                    e_window = 0.0
                    window["segments"].append({"end": end, "norm": nd})
                    break
                nxt = next((u for u in uses if u >= end), tau)
                change = norm_params(sub_params(d, prev)) / nd if (nd > 0 and prev is not None) else 1.0
                seg_start = window["segments"][-1]["end"] if window["segments"] else t
                seg_mass, rest_mass = log.lr_mass(seg_start, end), log.lr_mass(end, nxt)
                e_window = change * rest_mass / seg_mass if seg_mass > 0 else float("inf")
                window["segments"].append({"end": end, "norm": nd, "relative_change": change,
                                           "estimated_carry_error": e_window, "rest_mass": rest_mass})
                prev = d
                if self.tol <= 0 or e_window <= self.tol or end - t >= limit:
                    break
                if self.max_window is not None and self._hopeless(log, window["segments"], t, end, limit, nxt, tau):
                    window["stopped"] = "the estimate would not reach tol within the budget"
                    break
            if not windows:  # the first window started from the recorded state: its end is exact
                self.exact_state = (window["end"], cf_theta, cf_opt)
            last_pair = (cf_theta, theta_w)  # exact counterfactual and recorded state at the window's end
            self._exact_at = (window["end"], cf_theta, cf_opt)
            windows.append(window)
            pos = window["end"]
            while i < len(uses) and uses[i] < pos:
                i += 1
        if pos < tau:
            d, D = self._carry(session, d, D, pos, tau)
            est += self._carry_estimate(e_window)
        theta, opt_state = rep.state_at(tau)
        params = {n: (theta[n].double() + d[n]).to(theta[n].dtype) for n in theta}
        new_state = _state_add(opt_state, D, betas) if D else opt_state
        check = self._function_check(session, ids, params, theta, last_pair, uses[0]) if windows[-1]["end"] < tau else None
        replayed = rep.steps_run - steps_before
        counterfactual = sum(w["end"] - w["start"] for w in windows)
        counterfactual += sum(c["probe"]["steps"] for c in self._carry_log if "probe" in c)  # the carries' probes
        carry_cost = sum(c.get("grad_equivalents", 0.0) for c in self._carry_log)
        info = {"propagation": "replay", "carry": self.carry, "K": self.K, "tol": self.tol,
                "windows": windows, "carries": self._carry_log, "counterfactual_steps": counterfactual,
                "recorded_steps_replayed": replayed - counterfactual, "recovery_steps": replayed - counterfactual,
                "estimated_error": est, "correction_norm": norm_params(d), "seconds": time.perf_counter() - t0,
                "steps_touched": uses, "grad_equivalents": float(replayed) + carry_cost,
                "grad_equivalents_total": float(replayed) + carry_cost + (check or {}).get("grad_equivalents", 0.0)}
        if check is not None:
            info["function_check"] = check
        return params, new_state, info

    FUNCTION_LIMIT = 4.0

    def _carry_estimate(self, e_window: float) -> float:
        """The estimated error of the carry just logged: its own measured estimate (``linear``,
        when a restore point lies inside it) or the window's change-rate rule."""
        measured = self._carry_log[-1].get("estimated_error")
        return e_window if measured is None else measured

    @staticmethod
    def _function_check(session, ids: list[int], params: Params, theta: Params, last_pair,
                        first_use: int) -> dict[str, Any]:
        """Function-space check of a carried answer, on the forgotten rows (forward passes only).

        ``A = KL(answer || untouched)`` at ``tau`` against ``B = KL(theta'_w || theta_w)``, what
        removing the samples did at the last window's end ``w`` (exact). With ``sqrt(KL)`` as a
        local distance (KL ~ a squared Fisher norm for small changes), the answer's distance to the
        retrained model is at least ``sqrt(A) - sqrt(K0)`` with ``K0`` the untouched model's; if the
        removal's effect does not grow after the window (``K0 <= B``, measured so on our runs:
        ``K0`` 0.3-0.9x ``B`` at the stops the adaptive windows reach), ``A > 4 B`` means the
        answer is farther than doing nothing: it is flagged. Measured: it fires on the one
        unflagged worse-than-nothing result of the regime runs (SGD, KL ratio 12.9: ``A/B`` 11.4)
        and on none of the good AdamW stops (``A/B`` <= 1)."""
        cf_w, theta_w = last_pair
        a = session.forget_kl(params, theta, ids)
        b = session.forget_kl(cf_w, theta_w, ids)
        ratio = a / b if b > 0 else (0.0 if a == 0 else float("inf"))
        rows_per_step = max(1, len(session.log.record(first_use).sample_ids))
        cost = 4 * len(ids) / (3 * rows_per_step)  # four forward passes over the rows, a third of a gradient each
        return {"kl_answer_vs_untouched": a, "kl_removal_at_window_end": b, "ratio": ratio,
                "limit": WindowedReplay.FUNCTION_LIMIT, "flagged": bool(ratio > WindowedReplay.FUNCTION_LIMIT),
                "grad_equivalents": cost}

    def _ends(self, log, t: int, tau: int):
        """Window ends: the first restore point at or after ``t + K``, then every later one."""
        end = window_boundary(log, t + self.K, tau)
        while True:
            yield end
            if end >= tau:
                return
            end = window_boundary(log, end + 1, tau)

    def _hopeless(self, log, segments: list[dict[str, Any]], start: int, end: int, limit: int, horizon: int,
                  tau: int) -> bool:
        """With a budget (``max_window``): stop early when the estimate could not reach ``tol``
        before the budget is spent. The estimate at a later end ``E`` is the change per unit of
        learning rate times the learning rate still to come after ``E`` (the schedule is known
        from the log); the change per unit of learning rate is projected to keep falling at the
        factor it fell by over the last segment (optimistic: it falls as the deviation settles)
        -- if even that projection misses ``tol`` within the budget, the window stops."""
        segs = [seg for seg in segments if seg.get("rest_mass")]
        if len(segs) < 3:  # the first segment's change is measured from d = 0: no rate yet
            return False
        rate = segs[-1]["estimated_carry_error"] / segs[-1]["rest_mass"]
        before = segs[-2]["estimated_carry_error"] / segs[-2]["rest_mass"]
        q = min(1.0, rate / before) if before > 0 else 1.0
        e = end
        while e - start < limit and e < tau:
            e = window_boundary(log, e + 1, tau)
            rate *= q
            if rate * log.lr_mass(e, horizon) <= self.tol:
                return False
        return True

    # ----------------------------------------------------------- carries
    def carry_between(self, session, d: Params, D: OptState, a: int, b: int) -> tuple[Params, OptState]:
        """This method's carry of a deviation ``(d, D)`` (parameters, optimizer state) from before
        step ``a`` to before step ``b``, on its own (``benchmarks/anatomy.py`` measures carries
        from exact window ends with it). No estimate is measured (no exact state is known here)."""
        self._carry_log, self._exact_at = [], None
        return self._carry(session, d, D, a, b)

    def _carry(self, session, d: Params, D: OptState, a: int, b: int) -> tuple[Params, OptState]:
        """Carry ``(d, D)`` from before step ``a`` to before step ``b`` (the estimate of the window
        that precedes a carry covers it)."""
        if self.carry == "linear":
            return self._carry_linear(session, d, D, a, b)
        spec, log = session.spec, session.log
        adam = spec.name.lower() == "adamw"
        sgd_mom = spec.name.lower() == "sgd" and spec.momentum != 0
        group = {n: gi for gi, g in enumerate(spec.groups) for n in g.names}
        b1, b2 = spec.betas
        d = {n: v.clone() for n, v in d.items()}
        D = {n: {k: v.clone() for k, v in st.items()} for n, st in (D or {}).items()}
        drain = self.carry == "momentum"
        state0 = None
        if drain and adam:
            _, state0 = session.replayer.state_at(a)
        for s in range(a, b):
            rec = log.record(s)
            k = s - a
            for n in d:
                g = group.get(n, 0)
                eta, wd = float(rec.lrs[g]), float(spec.groups[g].weight_decay)
                if adam:
                    d[n].mul_(1 - eta * wd)
                    if drain and n in D and "exp_avg" in D[n]:
                        st = state0[n]
                        step_count = float(st.get("step", torch.tensor(float(s)))) + 1 + k
                        bc1, bc2 = 1 - b1 ** step_count, 1 - b2 ** step_count
                        dm = D[n]["exp_avg"] * b1 ** (k + 1)
                        v = st["exp_avg_sq"].double() * b2 ** (k + 1)
                        d[n] -= eta * (dm / bc1) / (torch.sqrt(v / bc2) + spec.eps)
                elif sgd_mom:
                    d[n].mul_(1 - eta * wd)
                    if drain and n in D and "momentum_buffer" in D[n]:
                        d[n] -= eta * D[n]["momentum_buffer"] * spec.momentum ** (k + 1)
                else:
                    d[n].mul_(1 - eta * wd)
        n_steps = b - a
        for st in D.values():
            for key, rate in (("exp_avg", b1), ("exp_avg_sq", b2), ("momentum_buffer", spec.momentum)):
                if key in st:
                    st[key] = st[key] * rate ** n_steps
        self._carry_log.append({"from": a, "to": b, "carry": self.carry, "grad_equivalents": 0.0})
        return d, D

    def _carry_linear(self, session, d: Params, D: OptState, a: int, b: int) -> tuple[Params, OptState]:
        from .functional import FunctionalLM
        from .hvp import make_hvp_backend
        from .propagation import default_curvature_point, propagate

        rep, log = session.replayer, session.log
        # the exact counterfactual is known at a (a window's end): probe the carry at the restore
        # points in its first quarter, at least one (module docstring, "Estimated error")
        probes: list[int] = []
        if self._exact_at is not None and self._exact_at[0] == a:
            p = window_boundary(log, a + 1, b)
            while p < b and (not probes or p - a <= (b - a) // 4):
                probes.append(p)
                p = window_boundary(log, p + 1, b)
        steps = rep.iter_steps(a, b)
        first = next(steps)
        fl = FunctionalLM(session.template, first.params.keys(), router=session.router_aux)
        diag = session.log.diag_provider() if self.carry_hessian_mode == "diag" else None
        hvp = make_hvp_backend(self.carry_hessian_mode, fl, diag)

        def chained():
            yield first
            yield from steps

        init = {"d": {n: v.float() for n, v in d.items()}}
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if any(key in st for st in D.values()):
                init[{"exp_avg": "dm", "exp_avg_sq": "dv", "momentum_buffer": "db"}[key]] = {
                    n: D[n][key].float() for n in D if key in D[n]}
        point = default_curvature_point(session.spec, self.carry_hessian_mode)
        with fl.curvature_mode():
            res = propagate(chained(), session.spec, lambda st, p, g: {}, tau=b, K=b - a, fl=fl, hvp=hvp,
                            damping=self.damping, initial=init, curvature_point=point,
                            probe_steps=probes)
        delta = res.delta_params[0]
        st = res.delta_opt_state[0]
        newD = {n: {k: v.double() for k, v in s.items()} for n, s in st.items()}
        cost = res.stats.grad_evals + res.stats.hvp_vectors * hvp.cost_in_grads
        entry = {"from": a, "to": b, "carry": "linear", "hessian_mode": self.carry_hessian_mode,
                 "curvature_point": point, "grad_equivalents": cost, "hvp_vectors": res.stats.hvp_vectors}
        if probes:
            # the exact continuation from a through the probes, one replayed step per step (counted
            # by the replayer, like the windows)
            _, cf_theta, cf_opt = self._exact_at
            rep.seek(a)
            rep.load_state(cf_theta, cf_opt)
            errors = probe_errors(rep, self._ids, {p: res.stats.probe[p][0] for p in probes})
            p, e_p = errors[-1]
            entry.update(probe={"steps": p - a, "relative_errors": errors},
                         estimated_error=extrapolated_error(log, a, p, b, e_p))
        self._carry_log.append(entry)
        return {n: v.double() for n, v in delta.items()}, newD
