"""Unit checks of the building blocks: checksummed lines, exact update vectors, settings."""

import math

import pytest
import torch

from lmcleaner.trajectory import TrajectoryLogError, apply_update, encode_update, resolve_settings
from lmcleaner.trajectory.jsonl import decode_line, encode_line, scan


def test_line_roundtrip_and_every_corruption_is_detected(tmp_path):
    obj = {"step": 3, "loss": 2.5, "ids": [[1, 2], [3]], "lr": 1e-3, "nan": math.inf}
    line = encode_line(obj)
    assert line.endswith(b"\n") and decode_line(line) == obj
    for cut in range(len(line) - 1):  # any truncation
        assert decode_line(line[:cut]) is None
    for k in range(len(line) - 1):  # any single-byte change
        bad = bytearray(line)
        bad[k] ^= 0x01
        assert decode_line(bytes(bad)) is None, k


def test_scan_stops_at_the_first_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    good = [encode_line({"step": i}) for i in range(3)]
    p.write_bytes(b"".join(good) + good[0][:-5])
    res = scan(p)
    assert [e["step"] for e in res.entries] == [0, 1, 2]
    assert res.bad_line == 4 and res.torn_bytes == len(good[0]) - 5


def test_update_vectors_add_back_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, generator=g) * 1e-3
    # adversarial values: zeros, signed zeros, sign changes, tiny and huge ratios, subnormals
    a[:8] = torch.tensor([0.0, -0.0, 1e-38, -1e-30, 3.0e-45, 1.0, -1.0, 1e20])
    b = a + torch.randn(5000, generator=g) * 1e-3
    b[:8] = torch.tensor([-0.0, 0.0, -1e-7, 2e-38, 1.0, 1e-30, 1e-9, 1e-20])
    u, pi, pv = encode_update(a, b, torch.float32)
    assert u.dtype == torch.float32 and torch.equal(u, b - a)
    out = apply_update(a, u, pi, pv)
    assert torch.equal(out.view(torch.int32), b.view(torch.int32))
    assert pi is not None and 0 < pi.numel() < 20  # a few patched elements, not a copy
    # lossy dtype: no patch, approximate
    u16, pi16, _ = encode_update(a, b, torch.bfloat16, exact=False)
    assert u16.dtype == torch.bfloat16 and pi16 is None
    assert torch.allclose(apply_update(a, u16)[8:], b[8:], atol=1e-4)


def test_settings_presets_and_errors():
    light = resolve_settings({})
    assert (light.storage, light.store_updates, light.store_batches, light.diag_estimator) == ("light", False, False, None)
    heavy = resolve_settings({"storage": "heavy"})
    assert heavy.store_updates and heavy.store_batches and heavy.exact_updates
    assert resolve_settings({"storage": "diag"}).diag_estimator == "hutchinson"
    assert resolve_settings({"compute_diag_h": True, "diag_estimator": "empirical_fisher"}).diag_estimator == "empirical_fisher"
    assert resolve_settings({"save_batch_data": True}).store_batches
    assert resolve_settings({"save_indices_only": False}).store_batches
    assert not resolve_settings({"storage": "heavy", "tensor_dtype": "bfloat16"}).exact_updates
    for bad, match in [({"max_steps": 0}, "window must be >= 1"), ({"storage": "huge"}, "storage"),
                       ({"mode": "token"}, "mode"), ({"tensor_dtype": "int8"}, "tensor_dtype"),
                       ({"diag_estimator": "kfac"}, "diag_estimator"), ({"save_interval": 0}, "save_interval")]:
        with pytest.raises(TrajectoryLogError, match=match):
            resolve_settings(bad)


def test_config_validation_rejects_an_empty_window(tmp_path):
    from lmcleaner.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="window must be >= 1"):
        load_config(overrides=["training_logger.max_steps=0"])


def test_fast_record_encoding_matches_the_shared_type():
    from lmcleaner.trajectory.types import StepRecord
    from lmcleaner.trajectory.writer import record_to_json

    r = StepRecord(3, 1, [[1, 2], [5]], [0.1, 0.2], 17, 2.5, 0.7, True, 99, [5])
    assert record_to_json(r) == r.to_json()  # fails when types.StepRecord gains a field
    assert record_to_json(r, save_rng_state=False)["rng_seed"] is None
