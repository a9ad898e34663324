"""Unlearning methods, one file each; importing this package registers them all
(``unlearn.registry``). A new method: one file here, one import line below."""

from . import (  # noqa: F401
    auto,
    grad_ascent,
    grad_diff,
    lmcleaner_batch,
    lmcleaner_sample,
    npo,
    replay,
    rollback,
    sgd_formula,
    simnpo,
)
