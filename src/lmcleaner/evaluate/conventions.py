"""Metric conventions: lmcleaner's definitions, or open-unlearning's, on identical inputs.

Why: the formulas agree with open-unlearning (locuslab/open-unlearning,
``src/evals/metrics``) except for a few conventions, and a user comparing our
numbers with a published open-unlearning table needs theirs. With
``lmcleaner eval --convention open-unlearning``:

1. **Last supervised token dropped** for exact memorisation, extraction
   strength, Min-K% and Min-K%++: their ``tokenwise_logprobs`` /
   ``tokenwise_vocab_logprobs`` keep the supervised positions ``[:-1]`` ("ignore
   the EOS prediction"). With ``n`` answer tokens they score ``n - 1``.
2. **Extraction strength floor**: the prefix search stops at ``k = m - 1``
   (``m`` the scored tokens), so a wrong last token gives ``1/m``, never 0; no
   scored token at all gives 0.
3. **zlib** divides the mean NLL by the zlib size of the *decoded supervised
   tokens* (``tokenizer.decode(labels != -100, skip_special_tokens=True)``),
   not of the raw answer string (which lacks e.g. the end-of-turn text and is
   not the tokenizer's round trip).
4. **Min-K%++ variance floor** ``1e-6`` (ours ``1e-12``, i.e. a std floor of
   ``1e-3`` against ``1e-6``): it matters on tokens the model is nearly sure of.

and their ``1e-10`` guards in the truth ratio ``P_pert / (P_base + 1e-10)``,
its forget aggregate ``min(TR, 1 / (TR + 1e-10))``, the normalised probability
``P / (P + sum P_wrong + 1e-10)`` and privleak ``(.. ) / (ref + 1e-10)``.
Everything else (probabilities, ROUGE-L recall, KS forget quality, harmonic
mean model utility, AUC) is the same. docs/evaluation.md lists the
differences with a worked example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LMCLEANER, OPEN_UNLEARNING = "lmcleaner", "open-unlearning"


@dataclass(frozen=True)
class Convention:
    name: str
    drop_last_token: bool  # EM, ES, Min-K%, Min-K%++ score the supervised tokens [:-1]
    es_floor: bool  # extraction strength: search stops at m - 1 (1/m floor), 0 when nothing is scored
    zlib_decoded_labels: bool  # zlib size of the decoded supervised tokens (else of the raw answer)
    min_k_pp_var_floor: float  # Min-K%++: variance clamped at this value before the square root
    eps: float  # guards of ratios (truth ratio, normalised probability, privleak)

    def scored(self, values: np.ndarray) -> np.ndarray:
        """The per-token values a memorisation / Min-K metric looks at."""
        return values[:-1] if self.drop_last_token else values


CONVENTIONS = {
    LMCLEANER: Convention(LMCLEANER, False, False, False, 1e-12, 0.0),
    OPEN_UNLEARNING: Convention(OPEN_UNLEARNING, True, True, True, 1e-6, 1e-10),
}


def get_convention(name: str | Convention | None) -> Convention:
    if isinstance(name, Convention):
        return name
    key = name or LMCLEANER
    if key not in CONVENTIONS:
        raise ValueError(f"unknown metric convention '{name}': choose one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[key]


def extraction_strength_ou(correct: np.ndarray) -> float:
    """open-unlearning's extraction strength over already-scored tokens (see point 2)."""
    m = int(correct.size)
    if m == 0:
        return 0.0
    k = m - 1
    for j in range(m):
        if correct[j:].all():
            k = j
            break
    return 1.0 - k / m


def nan_if_empty(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan
