"""One-GPU check: train a ~100M Llama in bf16 with the recorder, unlearn 4 samples, write JSON.

Run through ``benchmarks/gpu_check.sh`` (sets the environment for deterministic
CUDA kernels and a time limit). Phases, each timed and written to
``<out>/gpu_check.json`` as soon as it finishes (a phase that fails records
its one-line error and the others still run):

1. ``model``: a Llama built from a ``transformers`` config written to
   ``<out>/model_config.json`` (hidden 768, 12 layers, GQA 12/4 heads, MLP
   2048, vocab 16384: 100.7M parameters), random init, no download;
2. ``train``: 200 steps, bf16 autocast (float32 master weights), AdamW, the
   recorder in light mode (checkpoint every 50 steps) on the embedded QA data
   (3,200 rows, one epoch): wall time, tokens/s (all input tokens and
   supervised tokens), peak GPU memory, bytes on disk against ``lmcleaner
   plan``'s prediction;
3. ``hvp``: at a recorded step, the wall time of one exact HVP (double
   backward, float32) and one GGN product over one gradient of the step loss
   (median of 5): the ``h`` of DESIGN §3's cost model on this device;
4. ``unlearn``: 4 samples used around 25% of the run before its end, removed
   by exact ``replay`` and by ``LMCleanerSampleLevel`` (exact HVP, full
   window); wall time, gradient-equivalents, peak memory, and the relative
   error ``||theta_lmc - theta_replay|| / ||theta - theta_replay||`` (replay
   is the exact-retrain oracle);
5. ``retrain``: the exact retrain from scratch; ``replay_equals_retrain``
   says whether this device's kernels reproduce training bit for bit.

``--smoke`` runs the same phases on CPU with the micro Llama preset and 12
steps (seconds), so the script is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

GPU_MODEL = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 16384,
             "max_position_embeddings": 512, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def settings(smoke: bool, out: Path) -> dict:
    if smoke:
        return {"overrides": ["model=micro-llama", "training.num_samples=48", "training.batch_size=4",
                              "training.max_steps=12", "training.torch_threads=1",
                              "training_logger.checkpoint_interval=4"],
                "samples": 48, "steps": 12, "hvp_repeats": 3}
    cfg = out / "model_config.json"
    cfg.write_text(json.dumps(GPU_MODEL, indent=2))
    return {"overrides": [f"model.name_or_path={cfg}", "model.tokenizer=embedded", "model.attn_implementation=sdpa",
                          "training.dataset_name=embedded:400", "training.batch_size=16", "training.max_steps=200",
                          "training.mixed_precision=bf16", "training.learning_rate=3e-4", "training.warmup_steps=20",
                          "training_logger.checkpoint_interval=50"],
            "samples": 3200, "steps": 200, "hvp_repeats": 5}


class Report:
    """The JSON document, rewritten atomically after every phase."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        os.replace(tmp, self.path)

    def phase(self, name: str, fn):
        t0 = time.perf_counter()
        try:
            result = fn()
            self.doc[name] = {**(result or {}), "seconds": time.perf_counter() - t0}
            ok = True
        except Exception as err:  # noqa: BLE001 - a failed phase is a result too
            self.doc[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                              "seconds": time.perf_counter() - t0}
            traceback.print_exc()
            ok = False
        self.write()
        print(f"gpu_check: {name}: {'ok' if ok else self.doc[name]['error']} ({self.doc[name]['seconds']:.1f} s)",
              flush=True)
        return ok


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def peak() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if cuda() else None


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rel_error(params: dict, theta: dict, oracle: dict) -> float:
    num = sum(((params[n].double() - oracle[n].double()) ** 2).sum() for n in oracle)
    den = sum(((theta[n].double() - oracle[n].double()) ** 2).sum() for n in oracle)
    return float((num / den).sqrt()) if den > 0 else float("nan")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="output folder (default: $OUT)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 12 steps, CPU: test the script itself")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cuda():
        torch.use_deterministic_algorithms(True, warn_only=True)  # bit-exact replay needs deterministic kernels
    import transformers

    from lmcleaner.config import load_config

    s = settings(args.smoke, out)
    run = out / "run"
    common = [*s["overrides"], "training.progress_bar=false", "training.logging_steps=0",
              f"training.output_dir={run}"]
    report = Report(out / "gpu_check.json", {
        "mode": "smoke" if args.smoke else "gpu",
        "device": torch.cuda.get_device_name(0) if cuda() else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "overrides": common,
    })
    state: dict = {}

    def model_phase():
        from lmcleaner.plan.shapes import model_shape

        cfg = load_config(overrides=common)
        shape = model_shape(cfg.model, cfg.lora)
        state["cfg"], state["shape"] = cfg, shape
        return {"parameters": shape.parameters, "architecture": shape.architecture}

    def train_phase():
        from lmcleaner.data import Collator
        from lmcleaner.plan.estimate import make_plan
        from lmcleaner.train import Trainer

        cfg = state["cfg"]
        trainer = Trainer(cfg)
        collate = Collator(trainer.dataset.pad_token_id)
        tokens = supervised = 0
        for step in range(s["steps"]):
            for mb in trainer.plan.micro_batches(step):
                b = collate([trainer.dataset[i] for i in mb])
                tokens += int(b["attention_mask"].sum())
                supervised += int((b["labels"][:, 1:] != -100).sum())
        reset_peak()
        sync()
        t0 = time.perf_counter()
        trainer.train()
        sync()
        seconds = time.perf_counter() - t0
        plan = make_plan(cfg, state["shape"], len(trainer.dataset))
        ckpt_measured = dir_bytes(run / f"checkpoint-{s['steps']}")
        return {"steps": s["steps"], "train_seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                "supervised_tokens_per_s": supervised / seconds, "steps_per_s": s["steps"] / seconds,
                "peak_gpu_memory_bytes": peak(), "final_loss": trainer.state.history[-1]["loss"],
                "checkpoint_bytes": ckpt_measured, "checkpoint_bytes_planned": plan["storage"]["checkpoint"]["total"],
                "log_bytes": dir_bytes(run / "training_log"), "log_bytes_planned": plan["storage"]["log"]["total"]}

    def hvp_phase():
        from lmcleaner.unlearn.functional import FunctionalLM, to_compute
        from lmcleaner.unlearn.hvp import make_hvp_backend
        from lmcleaner.unlearn.session import UnlearnSession

        session = UnlearnSession(run)
        state["session"] = session
        t = session.tau // 2
        st = next(session.replayer.iter_steps(t, t + 1))
        params, batches = to_compute(st.params), st.batches  # on the model's device / collated on the CPU
        fl = FunctionalLM(session.template, params.keys(), router=session.router_aux)
        gen = torch.Generator().manual_seed(0)
        v = {n: torch.randn(p.shape, generator=gen).to(p.device)[None] for n, p in params.items()}
        n = st.record.normaliser
        out = {"step": t}
        with fl.curvature_mode():
            g = median_seconds(lambda: fl.grad(params, batches, n), s["hvp_repeats"])
            for mode in ("exact", "GGN"):
                backend = make_hvp_backend(mode, fl)
                h = median_seconds(lambda backend=backend: backend.hvp(params, batches, n, v), s["hvp_repeats"])
                out[f"{mode}_hvp_seconds"] = h
                out[f"{mode}_hvp_over_grad"] = h / g
        out["grad_seconds"] = g
        return out

    def unlearn_phase():
        session = state.get("session")
        if session is None:
            from lmcleaner.unlearn.session import UnlearnSession

            session = state["session"] = UnlearnSession(run)
        tau = session.tau
        first = tau - max(4, tau // 4)
        ids = [session.log.record(first + k).sample_ids[0] for k in range(4)]  # 4 steps, one sample each
        theta, _ = session.replayer.state_at(tau)
        res = {"forget_ids": ids, "first_use_step": first, "tau": tau}
        reset_peak()
        t0 = time.perf_counter()
        replay = session.run("replay", ids)
        sync()
        res["replay"] = {"seconds": time.perf_counter() - t0, "grad_equivalents": replay.info["grad_equivalents_total"],
                         "peak_gpu_memory_bytes": peak()}
        reset_peak()
        t0 = time.perf_counter()
        lmc = session.run("LMCleanerSampleLevel", ids, hessian_mode="exact")
        sync()
        res["lmcleaner"] = {"seconds": time.perf_counter() - t0,
                            "grad_equivalents": lmc.info["grad_equivalents_total"],
                            "hvp_directions": lmc.info.get("n_hvp_vectors"), "diverged": lmc.info.get("diverged"),
                            "peak_gpu_memory_bytes": peak(),
                            "rel_error": rel_error(lmc.params, theta, replay.params)}
        res["lmcleaner_over_replay_seconds"] = res["lmcleaner"]["seconds"] / res["replay"]["seconds"]
        state["replay"], state["ids"] = replay.params, ids
        return res

    def retrain_phase():
        from lmcleaner.train import Trainer
        from lmcleaner.unlearn.cli_retrain import retrain_config

        trainer = Trainer(retrain_config(run, state["ids"], out / "retrain"))
        trainer.train()
        oracle = {n: p.detach().cpu() for n, p in trainer.engine.trainable().items()}
        replay = state["replay"]
        same = all(torch.equal(replay[n].cpu(), oracle[n]) for n in oracle)
        return {"replay_equals_retrain": same,
                "max_abs_diff": max(float((replay[n].cpu().float() - oracle[n].float()).abs().max()) for n in oracle)}

    report.phase("model", model_phase) and report.phase("train", train_phase)
    if "train" in report.doc and "error" not in report.doc["train"]:
        report.phase("hvp", hvp_phase)
        if report.phase("unlearn", unlearn_phase):
            report.phase("retrain", retrain_phase)
    failed = [k for k, v in report.doc.items() if isinstance(v, dict) and "error" in v]
    print(f"gpu_check: wrote {report.path}" + (f" (failed: {failed})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
