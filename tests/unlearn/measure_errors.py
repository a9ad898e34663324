"""Print the fidelity table (relative error to the exact retrain) for the test setups.

    cd /work/main && PYTHONPATH=src python -m tests.unlearn.measure_errors

Not a test (no asserts); the bounds in ``test_unlearn_groundtruth.py`` come from here.
Each cell is min-max over three forgotten samples (first seen at steps 1, 2, 3).
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import torch

from lmcleaner.unlearn import ExactHVP, FunctionalLM, LMCleanerBatchLevel, LMCleanerSampleLevel, Rollback, SGDFormula
from lmcleaner.unlearn.functional import to_compute

from .conftest import LLAMA_ADAMW, LLAMA_SGD, MLP_ADAMW, MLP_SGD, Setup, one_thread
from .unlearn_harness import TinyMLPLM, occurrences, rel_error, tiny_llama

FULL = 800


def exact_diagonal(setup: Setup, chunk: int = 512):
    """Exact Hessian diagonal per step via batched HVPs with basis vectors (for diag mode)."""
    fl = FunctionalLM(setup.model, setup.steps[0].params.keys())
    hvp = ExactHVP(fl)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def provider(step: int):
        if step not in cache:
            st = setup.steps[step]
            params = to_compute(st.params)
            names = list(params)
            sizes = [params[n].numel() for n in names]
            P = sum(sizes)
            diag = torch.empty(P)
            with fl.curvature_mode():
                for a in range(0, P, chunk):
                    b = min(P, a + chunk)
                    E = torch.zeros(b - a, P)
                    E[torch.arange(b - a), torch.arange(a, b)] = 1
                    V = {n: t.reshape(b - a, *params[n].shape) for n, t in zip(names, E.split(sizes, 1))}
                    out = hvp.hvp(params, st.batches, st.record.normaliser, V)
                    flat = torch.cat([out[n].reshape(b - a, -1) for n in names], 1)
                    diag[a:b] = flat[torch.arange(b - a), torch.arange(a, b)]
            cache[step] = {n: t.reshape(params[n].shape) for n, t in zip(names, diag.split(sizes))}
        return cache[step]

    return provider


def at_final_weights(setup: Setup, steps):
    out = []
    for s in steps:
        s2 = copy.copy(s)
        s2.params = setup.run.final
        out.append(s2)
    return out


def rows(setup: Setup, adam: bool, k_mid: int):
    diag = exact_diagonal(setup)
    r = [
        ("no-op", None),
        ("rollback (no propagation)", lambda: Rollback()),
        ("exact, K=1", lambda: LMCleanerSampleLevel(K=1, hessian_mode="exact")),
        (f"exact, K={k_mid}", lambda: LMCleanerSampleLevel(K=k_mid, hessian_mode="exact")),
        ("exact, full window", lambda: LMCleanerSampleLevel(K=FULL, hessian_mode="exact")),
        ("exact, full, Hessian at final weights", "final"),
        ("GGN, full window", lambda: LMCleanerSampleLevel(K=FULL, hessian_mode="GGN")),
        ("diag (exact diagonal), full", lambda: LMCleanerSampleLevel(K=FULL, hessian_mode="diag")),
    ]
    if adam:
        r += [
            ("SGD formula (optimizer ignored)", lambda: SGDFormula(K=FULL, hessian_mode="exact")),
            ("AdamW linear map, v frozen", lambda: LMCleanerSampleLevel(
                K=FULL, hessian_mode="exact", track_second_moment=False, optimizer_map="linear")),
            ("AdamW exact map, v frozen", lambda: LMCleanerSampleLevel(
                K=FULL, hessian_mode="exact", track_second_moment=False)),
            ("AdamW linear map (DESIGN formulas), dm dv", lambda: LMCleanerSampleLevel(
                K=FULL, hessian_mode="exact", optimizer_map="linear")),
        ]
    return r, diag


def measure(name: str, setup: Setup, adam: bool, k_mid: int) -> None:
    samples = [setup.schedule[1][0][0], setup.schedule[2][1][0], setup.schedule[3][0][1]]
    table, diag = rows(setup, adam, k_mid)
    clipped = sum(s.record.clipped for s in setup.steps)
    print(f"\n### {name}: {len(setup.steps)} steps, clipped on {clipped}; "
          f"{sum(p.numel() for p in setup.model.parameters())} params")
    print("| correction | rel. error | seconds |\n|---|---|---|")
    for label, make in table:
        errs, secs = [], []
        for z in samples:
            occ = occurrences(setup.steps, z)
            re = setup.retrain(frozenset({z}))
            if make is None:
                errs.append(1.0)
                continue
            steps = setup.steps[occ[0]:]
            method = make() if make != "final" else LMCleanerSampleLevel(K=FULL, hessian_mode="exact")
            if make == "final":
                steps = at_final_weights(setup, steps)
            t0 = time.perf_counter()
            c = method.compute(setup.model, steps, setup.spec, [z], setup.tau,
                               diag if "diag" in label else None)
            secs.append(time.perf_counter() - t0)
            errs.append(rel_error(setup.run.final, c.delta_params, re.final))
        s = f"{max(secs):.1f}" if secs else "-"
        print(f"| {label} | {min(errs):.3f}–{max(errs):.3f} | {s} |")
    # batch level: three steps (for AdamW: clipped ones where available)
    ts = [s.step for s in setup.steps[3:] if (not adam or s.record.clipped)][:3]
    for label, make in (("batch level, rollback", lambda: Rollback("batch")),
                        ("batch level, exact full", lambda: LMCleanerBatchLevel(K=FULL, hessian_mode="exact")),
                        ("batch level, exact full, linear map", lambda: LMCleanerBatchLevel(
                            K=FULL, hessian_mode="exact", optimizer_map="linear"))):
        errs = []
        for t in ts:
            re = setup.retrain(frozenset(), frozenset({t}))
            c = make().compute(setup.model, setup.steps[t:], setup.spec, [t], setup.tau)
            errs.append(rel_error(setup.run.final, c.delta_params, re.final))
        print(f"| {label} (steps {ts}) | {min(errs):.3f}–{max(errs):.3f} | |")


def main() -> None:
    warnings.filterwarnings("ignore")
    which = sys.argv[1:] or ["mlp_sgd", "mlp_adamw", "llama_sgd", "llama_adamw"]
    with one_thread():
        for w in which:
            if w == "mlp_sgd":
                measure("MLP LM, SGD momentum 0.9 + wd", Setup(lambda: TinyMLPLM(), 64, 3, MLP_SGD), False, 15)
            if w == "mlp_adamw":
                measure("MLP LM, AdamW + clipping", Setup(lambda: TinyMLPLM(), 64, 3, MLP_ADAMW), True, 15)
            if w == "llama_sgd":
                measure("tiny Llama (2 layers, hidden 16), SGD momentum + wd",
                        Setup(lambda: tiny_llama(), 32, 3, LLAMA_SGD), False, 8)
            if w == "llama_adamw":
                measure("tiny Llama (2 layers, hidden 16), AdamW + clipping",
                        Setup(lambda: tiny_llama(), 32, 3, LLAMA_ADAMW), True, 8)


if __name__ == "__main__":
    main()
