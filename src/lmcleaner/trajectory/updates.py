"""Exact update vectors: ``u_t = theta_{t+1} - theta_t`` that add back bit for bit.

Why: heavy mode promises past parameters without replay. A float32 difference
``u = fl(b - a)`` usually satisfies ``fl(a + u) == b`` (Sterbenz), but not
always (near zero, large relative moves). We store ``u`` as the honest update
vector and, for the few elements where adding it back does not give ``b``
exactly, a *patch* (flat indices + exact values). Forward reconstruction
``theta_{t+1} = apply_update(theta_t, u_t, patch)`` is then exact, and
``theta_s = theta_c + sum u`` from any restore point ``c <= s``.

With a lossy ``tensor_dtype`` (bf16/fp16) no patches are stored and the
reconstruction is approximate; ``meta.json`` says which.
"""

from __future__ import annotations

import torch

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so -0.0 vs 0.0 and NaN payloads count as different."""
    return x.contiguous().view(_INT_VIEW[x.element_size()])


def add_update(theta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``theta + u`` in float32 (or wider), cast back to ``theta``'s dtype.

    The writer and the reader both use this one function, so the patch
    computed at record time matches the arithmetic at read time.
    """
    wide = torch.promote_types(theta.dtype, torch.float32)
    return (theta.to(wide) + u.to(wide)).to(theta.dtype)


def encode_update(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype,
                  exact: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(u, patch_index, patch_value); the patch is ``None`` when nothing needs fixing."""
    wide = torch.promote_types(before.dtype, torch.float32)
    u = (after.to(wide) - before.to(wide)).to(dtype)
    if not exact:
        return u.contiguous(), None, None
    recon = add_update(before, u)
    bad = (_bits(recon) != _bits(after)).flatten().nonzero().flatten()
    if bad.numel() == 0:
        return u.contiguous(), None, None
    return u.contiguous(), bad.to(torch.int64).contiguous(), after.flatten()[bad].contiguous().clone()


def apply_update(theta: torch.Tensor, u: torch.Tensor, patch_index: torch.Tensor | None = None,
                 patch_value: torch.Tensor | None = None) -> torch.Tensor:
    """``theta_{t+1}`` from ``theta_t`` and the stored update (exact with its patch)."""
    out = add_update(theta, u)
    if patch_index is not None and patch_index.numel():
        flat = out.flatten()
        flat[patch_index] = patch_value.to(out.dtype)
        out = flat.view_as(out)
    return out
