"""Measure HVP cost in gradient evaluations (the numbers in ``unlearn/hvp.py``).

    cd /work/main && PYTHONPATH=src python -m tests.unlearn.bench_hvp [threads]

2-layer Llama, hidden 64, vocab 576 (147,776 params), one micro-batch of
4 rows x 32 tokens, float32, SDPA math kernel. Methods are interleaved over
rounds and the minimum per method is kept (robust to a shared, loaded machine).
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from lmcleaner.train.loss import IGNORE_INDEX, count_supervised
from lmcleaner.unlearn import ExactHVP, FunctionalLM, GGNHVP
from lmcleaner.unlearn.functional import to_compute



def main() -> None:
    warnings.filterwarnings("ignore")
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=576, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(1, 576, (4, 32))
    att = torch.ones_like(ids)
    att[1, 24:] = 0
    labels = ids.clone()
    labels[att == 0] = IGNORE_INDEX
    labels[:, :4] = IGNORE_INDEX
    batches = [{"input_ids": ids, "attention_mask": att, "labels": labels, "sample_ids": torch.arange(4)}]
    N = count_supervised(labels)
    fl = FunctionalLM(model, [n for n, _ in model.named_parameters()])
    params = to_compute(dict(model.named_parameters()))
    vecs = {k: {n: torch.randn(k, *p.shape) for n, p in params.items()} for k in (1, 8)}
    methods = {"grad": lambda: fl.grad(params, batches, N)}
    for impl in ("rev_rev", "fwd_rev", "double_backward"):
        for k in (1, 8):
            methods[f"exact/{impl} k={k}"] = (lambda impl=impl, k=k: ExactHVP(fl, impl).hvp(params, batches, N, vecs[k]))
    for k in (1, 8):
        methods[f"GGN k={k}"] = lambda k=k: GGNHVP(fl).hvp(params, batches, N, vecs[k])
    best = {m: float("inf") for m in methods}
    with fl.curvature_mode():
        for f in methods.values():
            f()  # warm up
        for _ in range(7):
            for m, f in methods.items():
                t0 = time.perf_counter()
                f()
                best[m] = min(best[m], time.perf_counter() - t0)
    g = best["grad"]
    print(f"{n_params} params, threads={threads}, gradient {g * 1e3:.1f} ms")
    print("| method | ms | gradient evals per direction |\n|---|---|---|")
    for m, t in best.items():
        k = 8 if m.endswith("k=8") else 1
        print(f"| {m} | {t * 1e3:.1f} | {t / g / k:.2f} |")


if __name__ == "__main__":
    main()
