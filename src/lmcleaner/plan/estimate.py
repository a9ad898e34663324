"""What recording and unlearning a run will cost, computed before anything runs.

Storage. Sizes come from the same encoders the trainer and the recorder use,
applied to the run's real parameter shapes (``shapes.py``) and batch plan:

- a checkpoint (``train.checkpoint``) holds the trainable parameters (LoRA:
  only the adapter) at their dtype, the optimizer state (AdamW: ``exp_avg``,
  ``exp_avg_sq`` at the parameter dtype + a float32 step; SGD with momentum:
  one buffer; none before the first step), and small JSON/RNG files with
  their SHA-256 in ``checksums.json`` (also listed per restore point in the
  log's ``checkpoints.json``);
- light mode keeps the checkpoints at multiples of ``C =
  checkpoint_interval`` from the restore point of the window start
  (``tau - window``) to ``tau``, plus the final one (and ``save_steps``
  checkpoints when set);
- the log holds per step one checksummed ``steps.jsonl`` line, one
  ``sample_indices.jsonl`` line per sample and an entry of
  ``batch_index.json``, all for the retained window (older steps are compacted
  away lazily, so between compactions the JSONL files can hold up to twice
  that); heavy mode adds per step an update vector of every trainable
  parameter (``tensor_dtype``) and the batch tensors (int64, padded width
  ``seq_len``), diag mode a diagonal per trainable parameter.

Cost (DESIGN §3), in gradient-equivalents (one training step = 1), for a
sample used once, at step ``t_z = tau - age``, with ``r`` the latest
checkpoint at or before ``t_z``:

- exact ``replay``: restore ``r`` and replay to ``tau`` without the sample:
  ``tau - r``;
- LMCleaner (sample level, truncation ``K``, curvature ``hessian_mode``):
  recover the past parameters by replaying ``r .. end`` with ``end = min(tau,
  t_z + K + 1)`` (``end - r``), one injection gradient at ``t_z`` and one HVP
  per propagated step ``K* = min(K, tau - t_z - 1)`` at ``h`` gradients each
  (``unlearn.hvp.HVP_COST_IN_GRADS``, measured), and the exact replay of its
  error estimate from ``r`` to the last checkpoint ``p > t_z`` within
  ``max(C, (tau - r) // 4)`` steps of ``r`` (``p - r``, 0 without one):
  ``(end - r) + 1 + K* h + (p - r)``.

A request older than the window cannot be unlearned from the log (only by
retraining). FLOPs per gradient-equivalent are the usual estimate ``6 P T``
(``4 P T`` for LoRA: no weight gradients of the frozen base; ``P`` the
parameters a token meets, i.e. only the routed experts of a mixture).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.loader import to_dict
from ..data.sampler import BatchPlan
from ..train.checkpoint import _rng_state
from ..train.engine import step_seed
from ..train.optim import build_optimizer, build_scheduler
from ..train.state import TrainState
from ..trajectory.jsonl import encode_line, seal
from ..trajectory.settings import resolve_settings
from ..trajectory.types import StepRecord
from ..trajectory.writer import record_to_json
from .shapes import ModelShape

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
# What a float from training looks like in JSON: 17 significant digits.
_LOSS, _NORM = 2.3456789012345678, 0.81234567890123456
#: the files of a one-process checkpoint (``train.checkpoint``), each hashed in ``checksums.json``
CHECKPOINT_FILES = ("model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors",
                    "scheduler.json", "trainer_state.json")
_SHA256 = "0" * 64
MAX_SAMPLED_STEPS = 256  # log lines are encoded for at most this many steps, then scaled


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def safetensors_bytes(entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                      metadata: dict[str, str] | None = None) -> int:
    """Size of a safetensors file holding these tensors (header JSON padded to 8 bytes + data)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in sorted(entries):
        n = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES.get(dtype, "F32"), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    h = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + h + (-h) % 8 + offset


def _json_file(obj: Any) -> int:
    """``train.checkpoint.write_json_atomic`` format."""
    return len(json.dumps(obj, indent=2, sort_keys=True).encode())


@dataclass
class RunShape:
    """The run's batch plan and schedule as the trainer will build them."""

    samples: int
    batch_size: int
    accumulation: int
    world_size: int
    steps: int
    seq_len: int
    plan: BatchPlan = field(repr=False, default=None)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world_size


def run_shape(cfg, samples: int, world_size: int, seq_len: int | None) -> RunShape:
    t = cfg.training
    plan = BatchPlan(samples, t.batch_size, t.gradient_accumulation_steps, world_size, t.seed)
    steps = t.max_steps if t.max_steps > 0 else t.num_epochs * plan.steps_per_epoch
    return RunShape(samples, t.batch_size, t.gradient_accumulation_steps, world_size, steps,
                    int(seq_len or t.max_length), plan)


class Planner:
    """Sizes and costs for one config + model shape (module docstring)."""

    def __init__(self, cfg, shape: ModelShape, run: RunShape):
        self.cfg, self.shape, self.run = cfg, shape, run
        self.settings = resolve_settings(cfg.training_logger)
        self.t = cfg.training
        self.meta_params = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in shape.trainable.items()}
        for p in self.meta_params.values():
            p.requires_grad_(True)
        self.optimizer = build_optimizer(self.meta_params, self.t)
        self.scheduler = build_scheduler(self.optimizer, self.t, run.steps)
        self._lrs = self._schedule()

    # ------------------------------------------------------------ schedule
    def _schedule(self) -> list[list[float]]:
        """Applied learning rates per step (the real scheduler on a meta optimizer), sampled."""
        import warnings

        out, sched = [], self.scheduler
        base = [g["lr"] for g in self.optimizer.param_groups]
        sampled = self._sample_steps(0, self.run.steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": nothing trains here
            for s in range(self.run.steps):
                if s in sampled:
                    out.append([float(g["lr"]) for g in self.optimizer.param_groups])
                sched.step()
        for g, lr in zip(self.optimizer.param_groups, base):
            g["lr"] = lr
        return out

    def _sample_steps(self, lo: int, hi: int) -> range:
        n = hi - lo
        stride = max(1, -(-n // MAX_SAMPLED_STEPS))
        return range(lo, hi, stride)

    # ---------------------------------------------------------- checkpoints
    @property
    def base(self) -> int:
        """The window's restore point: the first step the log can still reproduce at the end."""
        c = self.settings.checkpoint_interval
        return (max(0, self.run.steps - self.settings.window) // c) * c

    def checkpoint_steps(self) -> list[int]:
        """Checkpoints on disk at the end of training (recorder window + final + save_steps)."""
        tau, c = self.run.steps, self.settings.checkpoint_interval
        kept = set(range(self.base, tau + 1, c)) | {tau}
        if self.t.save_steps:
            saved = list(range(self.t.save_steps, tau + 1, self.t.save_steps))
            kept |= set(saved[-self.t.save_total_limit:] if self.t.save_total_limit else saved)
        return sorted(kept)

    def _optimizer_tensors(self, started: bool) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        if not started:
            return []
        out = []
        for n, (s, d) in self.shape.trainable.items():
            if self.t.optimizer == "adamw":
                out += [(f"{n}::exp_avg", s, d), (f"{n}::exp_avg_sq", s, d), (f"{n}::step", (), torch.float32)]
            elif self.t.momentum:
                out.append((f"{n}::momentum_buffer", s, d))
        return out

    def checkpoint_bytes(self, step: int) -> dict[str, int]:
        """Bytes of ``checkpoint-<step>`` by part."""
        weights = safetensors_bytes([(n, s, d) for n, (s, d) in self.shape.trainable.items()])
        opt_t = safetensors_bytes(self._optimizer_tensors(step > 0))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        scalars = ({n: {"momentum_buffer": None} for n in self.shape.trainable}
                   if step > 0 and self.t.optimizer == "sgd" and not self.t.momentum else {})
        opt_json = _json_file({"param_groups": groups, "scalars": scalars})
        sched = _json_file({**self.scheduler.state_dict(), "last_epoch": step, "_step_count": step + 1})
        other = opt_json + sched + self._rng_bytes() + self._trainer_state_bytes(step) + self._checksums_bytes()
        return {"weights": weights, "optimizer": opt_t, "other": other, "total": weights + opt_t + other}

    @staticmethod
    def _file_hashes() -> dict[str, str]:
        """``{file: sha256}`` of one checkpoint (``train.checkpoint``: one process, every file hashed)."""
        return {name: _SHA256 for name in CHECKPOINT_FILES}

    def _checksums_bytes(self) -> int:
        return _json_file({"algorithm": "sha256", "files": self._file_hashes()})

    def _rng_bytes(self) -> int:
        if not hasattr(self, "_rng"):
            rng_t, rng_meta = _rng_state()
            self._rng = safetensors_bytes([(k, tuple(v.shape), v.dtype) for k, v in rng_t.items()]) + \
                _json_file(rng_meta)
        return self._rng

    def _trainer_state_bytes(self, step: int) -> int:
        """``trainer_state.json`` after ``step`` steps: its loss history grows by one row per step."""
        def doc(history: list[dict]) -> int:
            state = TrainState(step=step, total_steps=self.run.steps, history=history,
                               checkpoint_reasons={s: ["recorder"] for s in self.checkpoint_steps() if s <= step})
            return _json_file({**state.to_json(), "config": to_dict(self.cfg), "dataset_fingerprint": "0" * 64,
                               "world_size": self.run.world_size})

        row = {"step": 0, "loss": _LOSS, "lr": self._lrs[0][-1] if self._lrs else 0.0, "grad_norm": _NORM}
        if step == 0:
            return doc([])
        one, two = doc([row]), doc([row, row])
        digits = sum(len(str(i)) - 1 for i in range(step))  # beyond the one digit of "0"
        return one + (two - one) * (step - 1) + digits

    # ------------------------------------------------------------------ log
    def _step_lines(self, step: int, lrs: list[float]) -> tuple[int, int, int]:
        """(steps.jsonl, sample_indices.jsonl, batch_index.json entry) bytes of one step."""
        mbs = self.run.plan.micro_batches(step)
        epoch, _ = self.run.plan.locate(step)
        rec = StepRecord(step=step, epoch=epoch, micro_batches=mbs, lrs=lrs,
                         normaliser=self.run.global_batch * max(1, self.run.seq_len // 2), loss=_LOSS,
                         grad_norm=_NORM, clipped=False, rng_seed=step_seed(self.t.seed, step))
        steps = len(encode_line(record_to_json(rec, self.settings.save_rng_state)))
        samples = sum(len(seal(b'{"id":%d,"step":%d,"mb":%d,"pos":%d}' % (i, step, m, pos)))
                      for m, ids in enumerate(mbs) for pos, i in enumerate(ids))
        index = len(f'"{step}":'.encode()) + len(json.dumps(mbs, separators=(",", ":")).encode()) + 1
        return steps, samples, index

    def _tensor_bytes_per_step(self) -> int:
        s, per = self.settings, []
        step = 10 ** (len(str(self.run.steps)) - 1)  # a key with the typical number of digits
        if s.store_updates:
            per += [(f"u/{step}/{n}", shape, s.torch_dtype) for n, (shape, _) in self.shape.trainable.items()]
        if s.diag_estimator is not None:
            per += [(f"diag/{step}/{n}", shape, s.torch_dtype) for n, (shape, _) in self.shape.trainable.items()]
        if s.store_batches:
            rows = self.run.batch_size
            for m in range(self.run.accumulation * self.run.world_size):
                for f in ("input_ids", "attention_mask", "labels"):
                    per.append((f"batch/{step}/{m}/{f}", (rows, self.run.seq_len), torch.int64))
                per.append((f"batch/{step}/{m}/sample_ids", (rows,), torch.int64))
        if not per:
            return 0
        flush = self.settings.save_interval
        meta = {"format": "lmcleaner-trajectory", "format_version": "1", "first_step": str(step),
                "last_step": str(step + flush - 1), "crc32": "0" * 8}
        one = safetensors_bytes(per, meta) - safetensors_bytes([], meta)  # the step's data + header entries
        return one + safetensors_bytes([], meta) // flush  # the file header shared by a flush

    def log_bytes(self) -> dict[str, Any]:
        """Bytes of the training log at the end of training (retained window) and per step."""
        tau, lo = self.run.steps, self.base
        sampled = list(self._sample_steps(0, tau))
        lines = [self._step_lines(s, self._lrs[k] if k < len(self._lrs) else self._lrs[-1])
                 for k, s in enumerate(sampled)]
        per_step = [sum(x) / len(lines) for x in zip(*lines)] if lines else [0, 0, 0]
        retained = tau - lo
        tensors = self._tensor_bytes_per_step()
        status = {"run_fingerprint": "0" * 32, "storage": self.settings.storage, "world_size": self.run.world_size,
                  "closed": True, "last_step": tau - 1, "first_step": lo, "updated": 1796164604.9627826,
                  "format_version": 1}
        # paths relative to the log directory, with the hashes of the checkpoint's files (``trajectory.restore``)
        points = [{"step": s, "path": f"../checkpoint-{s}", "kind": "checkpoint", "files": self._file_hashes()}
                  for s in self.checkpoint_steps()]
        fixed = {
            "meta.json": self._meta_bytes(),
            "checkpoints.json": len(json.dumps({"format_version": 1, "restore_points": points},
                                               separators=(",", ":"))),
            "batch_index.json (head)": len(json.dumps(status, separators=(",", ":"))) + len(',"batches":{}}'),
        }
        files = {"steps.jsonl": per_step[0] * retained, "sample_indices.jsonl": per_step[1] * retained,
                 "batch_index.json": per_step[2] * retained + fixed["batch_index.json (head)"],
                 "meta.json": fixed["meta.json"], "checkpoints.json": fixed["checkpoints.json"],
                 "tensors": tensors * retained}
        return {"per_step": {"steps.jsonl": per_step[0], "sample_indices.jsonl": per_step[1],
                             "batch_index.json": per_step[2], "tensors": tensors,
                             "total": sum(per_step) + tensors},
                "retained_steps": retained, "files": {k: int(v) for k, v in files.items()},
                "total": int(sum(files.values()))}

    def _meta_bytes(self) -> int:
        from ..train.optim import optimizer_spec

        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        meta = {"config": to_dict(self.cfg), "optimizer": optimizer_spec(self.optimizer, self.t).to_json(),
                "settings": self.settings.to_json(), "param_groups": groups,
                "optimizer_hparams": {k: v for k, v in self.optimizer.defaults.items()},
                "param_shapes": {n: [list(s), str(d).removeprefix("torch.")] for n, (s, d) in self.shape.trainable.items()}}
        # identity, fingerprints, counters, versions: ~600 bytes measured on the tiny runs
        return len(json.dumps(meta, separators=(",", ":"), default=str)) + 600

    # ---------------------------------------------------------------- costs
    def request_cost(self, age: int, K: int, hessian_mode: str, hvp_cost: float) -> dict[str, Any]:
        tau, c = self.run.steps, self.settings.checkpoint_interval
        t_z = tau - age
        restore = (t_z // c) * c
        row: dict[str, Any] = {"age": age, "step": t_z}
        if age < 1 or t_z < 0:
            row["error"] = f"age must be 1..{tau} (steps before the end of training)"
            return row
        if t_z < self.base:
            row["in_window"] = False
            row["note"] = "older than the window: only retraining (lmcleaner retrain) can remove it"
            return row
        replay = tau - restore
        end = min(tau, t_z + K + 1)
        k_star = min(K, tau - t_z - 1)
        probe = self.probe_steps(t_z, restore)
        lmc = (end - restore) + 1 + k_star * hvp_cost + probe
        row.update({
            "in_window": True, "restored_from": restore,
            "replay": {"steps": replay, "grad_equivalents": float(replay)},
            "lmcleaner": {"K": K, "hessian_mode": hessian_mode, "recovery_steps": end - restore,
                          "hvp_directions": k_star, "hvp_cost_in_grads": hvp_cost, "injection_grads": 1,
                          "error_probe_steps": probe,
                          "grad_equivalents": float(lmc)},
            "lmcleaner_over_replay": lmc / replay if replay else None,
            "regime": ("LMCleaner cheaper" if lmc < replay else "replay cheaper (recent request or K too large)"),
        })
        return row

    def probe_steps(self, t_z: int, restore: int) -> int:
        """Steps replayed for the error estimate (``unlearn.handlers._correction``): one exact
        counterfactual replay from ``restore`` to the last checkpoint after the use that is at
        most ``max(C, (tau - restore) // 4)`` steps past ``restore``; 0 when none is."""
        tau, c = self.run.steps, self.settings.checkpoint_interval
        budget = max(c, (tau - restore) // 4)
        points = [p for p in self.checkpoint_steps() if t_z < p < tau and p - restore <= budget]
        return points[-1] - restore if points else 0

    def flops_per_grad(self) -> float:
        tokens = self.run.global_batch * self.run.seq_len
        factor = 4.0 if self.cfg.lora.enabled else 6.0
        return factor * self.shape.active_parameters * tokens


def make_plan(cfg, shape: ModelShape, samples: int, ages: list[int] | None = None, world_size: int = 1,
              seq_len: int | None = None) -> dict[str, Any]:
    """Everything ``lmcleaner plan`` prints, as JSON-able data.

    ``ages``: request ages in steps before the end (default: 1%, 10% and 50% of the steps)."""
    from ..unlearn.hvp import HVP_COST_IN_GRADS

    run = run_shape(cfg, samples, world_size, seq_len)
    if not ages:
        ages = sorted({max(1, run.steps // 100), max(1, run.steps // 10), max(1, run.steps // 2)})
    planner = Planner(cfg, shape, run)
    ckpt_steps = planner.checkpoint_steps()
    per_ckpt = {s: planner.checkpoint_bytes(s) for s in ckpt_steps}
    last = per_ckpt[ckpt_steps[-1]]
    log = planner.log_bytes()
    ma = cfg.trainer.method_args
    K = int(ma.get("K", 800)) if hasattr(ma, "get") else 800
    mode = str(ma.get("hessian_mode", "exact")) if hasattr(ma, "get") else "exact"
    hvp_cost = float(HVP_COST_IN_GRADS.get(mode, HVP_COST_IN_GRADS["exact"]))
    save_dtype = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.training.save_precision]
    base_params = shape.parameters - (shape.trainable_parameters if cfg.lora.enabled else 0)
    export = {"merged_model": base_params * save_dtype}
    if cfg.lora.enabled:
        export["adapter"] = shape.trainable_parameters * save_dtype
    ckpt_total = sum(v["total"] for v in per_ckpt.values())
    t = cfg.training
    return {
        "model": shape.to_json(),
        "run": {"samples": samples, "batch_size": t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "world_size": world_size, "global_batch": run.global_batch, "steps": run.steps,
                "epochs": run.steps / max(1, run.plan.steps_per_epoch), "seq_len": run.seq_len,
                "optimizer": t.optimizer, "lora_r": cfg.lora.r if cfg.lora.enabled else None,
                "storage": planner.settings.storage, "window": planner.settings.window,
                "checkpoint_interval": planner.settings.checkpoint_interval},
        "storage": {
            "checkpoint": last, "checkpoint_step0": per_ckpt[ckpt_steps[0]]["total"] if ckpt_steps[0] == 0 else None,
            "checkpoints_kept": ckpt_steps, "checkpoints_total": ckpt_total,
            "log": log, "export": export,
            "total": ckpt_total + log["total"] + export["merged_model"],
        },
        "requests": [planner.request_cost(a, K, mode, hvp_cost) for a in ages],
        "flops_per_grad_equivalent": planner.flops_per_grad(),
        "notes": [
            "costs: a sample used once, `age` steps before the end; 1 gradient-equivalent = 1 training step",
            f"HVP cost {hvp_cost} gradients per direction ({mode}, measured on CPU, unlearn/hvp/exact.py)",
            "log JSONL files are compacted lazily: up to 2x the retained bytes between compactions",
            "FLOPs: 6*P*T per step (4*P*T with LoRA), P = parameters a token meets, T = tokens per step",
        ],
    }


def measured_seq_len(trainer, steps: int = 12) -> int:
    """The mean padded width of the micro-batches of a run's first ``steps`` steps: the plan's
    ``--seq-len`` as the run's data and collator set it (for checking a plan against a run)."""
    from ..data import Collator

    collate = Collator(trainer.dataset.pad_token_id)
    widths = [collate([trainer.dataset[i] for i in mb])["input_ids"].shape[1]
              for s in range(steps) for mb in trainer.plan.micro_batches(s)]
    return round(sum(widths) / len(widths))
