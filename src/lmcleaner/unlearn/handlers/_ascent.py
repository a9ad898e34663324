"""Shared optimisation loop of the fine-tuning baselines (GradAscent, GradDiff, NPO, SimNPO).

These are the methods open-unlearning users compare against. None uses the
trajectory: each starts from the trained weights ``theta_tau`` and takes a few
epochs of optimizer steps on an unlearning objective

    L = gamma * F(forget batch) + alpha * R(retain batch),

where a method chooses the forget term ``F`` from per-row sequence
log-likelihoods (``nll_i`` = summed answer-token NLL of row ``i``, ``n_i`` =
its supervised tokens) and ``R`` is the retain loss (NLL or KL to the
frozen trained model).

- ``F`` is a sum of per-row terms ``r_i`` divided by the batch's supervised
  tokens (``forget_reduce = "tokens"``, GradAscent/GradDiff: ``r_i = -nll_i``,
  i.e. minus the token-mean NLL) or by its rows (``"rows"``, NPO/SimNPO: a
  per-sequence mean). ``R`` is a token mean over the retain batch. Each
  normaliser is taken over the *whole* batch, so splitting it into
  micro-batches (``micro_batch_size``) changes memory, never the result
  (up to float summation order). open-unlearning, through the HF Trainer,
  averages per-micro-batch token means instead; the two agree whenever the
  micro-batches hold equally many supervised tokens.

Defaults are open-unlearning's TOFU settings (``configs/trainer/finetune.yaml``,
``configs/experiment/unlearn/tofu/default.yaml`` and the HF
``TrainingArguments`` defaults it inherits): AdamW (betas 0.9/0.999, eps 1e-8),
learning rate 1e-5, weight decay 0.01 (not on biases and norm weights, as the
HF Trainer does), 10 epochs over the forget rows, 32 rows per optimizer step
(8 per device x 4 accumulation steps there; ``micro_batch_size=8`` here),
linear schedule with ``warmup_epochs=1`` (``int(warmup_epochs * n_forget //
batch_size)`` warmup steps, their formula), gradient clipping at norm 1.0.

Retain set (``anchor=forget`` in open-unlearning's ``ForgetRetainDataset``):
each forget row of a batch is paired with one retain row drawn uniformly,
with replacement, anew every epoch, from the training rows that are not
forgotten (nor excluded from training by an earlier request or
``training.exclude_ids``). The forget order is reshuffled every epoch. Both
draws and any dropout come from ``seed``: the result is a pure function of
the run, the ids and the config (tested).

Learning rate scale. TOFU fine-tunes at 1e-5 and open-unlearning unlearns at
1e-5: unlearning at the training learning rate. A model trained at 1e-3 barely
moves at 1e-5, so ``lr_relative=true`` reads ``lr`` as a multiple of each
parameter group's recorded training learning rate (``lr=1 lr_relative=true``
keeps the papers' ratio). The demo and benchmarks run the plain defaults;
docs/benchmarks.md has both on the demo run.

Cost in gradient-equivalents, the convention of every method's ``info``:
one gradient-equivalent is one forward+backward over one recorded training
step's batch (``B`` = global batch rows). A forward+backward over ``n`` rows
counts ``n / B``; a forward-only pass (NPO's reference model, the KL retain
loss's reference) counts ``n / (3 B)`` (a forward is about a third of a
forward+backward). The divergence guard's two forwards are a measurement and,
as for every method, not counted. Steps replayed to reach ``theta_tau`` are
``recovery_steps`` (0 when ``tau`` is a checkpoint).

The session's divergence guard is reported (``retain_loss_before/after``),
but ``diverged`` stays ``None``: the replay fallback is for linearised
trajectory corrections; a baseline that damages the retain set is a finding
about the baseline, not something to silently replace.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..result import UnlearnError, UnlearnResult

if TYPE_CHECKING:
    import torch
# torch and the training code are imported where they are used: registering the methods
# (`lmcleaner unlearn --help` lists them) must not import torch.

FORWARD_COST = 1.0 / 3.0  # a forward-only pass, in forward+backward units
SCHEDULES = ("linear", "constant", "cosine")
OPTIMIZERS = ("adamw", "sgd")
# Parameter names the HF Trainer exempts from weight decay (``Trainer.get_decay_parameter_names``,
# transformers 5); importing ``transformers.Trainer`` for them would cost seconds.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


@dataclass
class AscentConfig:
    """Optimisation arguments shared by the fine-tuning baselines (``trainer.method_args``).

    Defaults: open-unlearning's TOFU unlearning settings (see the module docstring).
    """

    lr: float = 1e-5  # peak learning rate (absolute, or a multiple of the run's with lr_relative)
    lr_relative: bool = False  # lr multiplies each param group's recorded training lr (1.0 = the papers' ratio)
    epochs: int = 10  # passes over the forget rows
    batch_size: int = 32  # forget rows per optimizer step (each paired with one retain row)
    micro_batch_size: int = 8  # rows per forward/backward (memory only; the result does not depend on it)
    optimizer: str = "adamw"  # adamw | sgd (plain SGD, no momentum)
    weight_decay: float = 0.01  # decoupled for adamw; not applied to biases and norm weights
    warmup_epochs: float = 1.0  # linear warmup over int(warmup_epochs * n_forget // batch_size) steps
    scheduler: str = "linear"  # linear | constant | cosine (after warmup)
    max_grad_norm: float = 1.0  # clip the global gradient norm (<= 0: off)
    seed: int = 0  # forget order, retain draws and dropout

    def validate(self) -> None:
        checks = [(self.lr > 0, "lr", "> 0"), (self.epochs >= 1, "epochs", ">= 1"),
                  (self.batch_size >= 1, "batch_size", ">= 1"),
                  (self.micro_batch_size >= 1, "micro_batch_size", ">= 1"),
                  (self.weight_decay >= 0, "weight_decay", ">= 0"),
                  (self.warmup_epochs >= 0, "warmup_epochs", ">= 0"),
                  (self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}"),
                  (self.scheduler in SCHEDULES, "scheduler", f"one of {list(SCHEDULES)}")]
        for ok, key, want in checks:
            if not ok:
                raise ValueError(f"trainer.method_args.{key}={getattr(self, key)!r}: must be {want}")


@dataclass
class RetainConfig(AscentConfig):
    """AscentConfig plus the retain term (open-unlearning's GradDiff arguments)."""

    gamma: float = 1.0  # weight of the forget term
    alpha: float = 1.0  # weight of the retain term
    retain_loss: str = "NLL"  # NLL (token-mean NLL) | KL (to the trained model, over supervised positions)

    def validate(self) -> None:
        super().validate()
        if self.retain_loss not in ("NLL", "KL"):
            raise ValueError(f"trainer.method_args.retain_loss={self.retain_loss!r}: must be NLL or KL")
        if self.alpha < 0 or self.gamma < 0:
            raise ValueError("trainer.method_args.alpha and gamma must be >= 0")


# ------------------------------------------------------------------ loss pieces
def sequence_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (summed answer-token NLL, supervised-token count), float32."""
    from ...train.loss import per_sample_nll

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return per_sample_nll(out.logits, batch["labels"])


def retain_kl_sum(model: torch.nn.Module, ref: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum over supervised positions of KL(p_ref || p_model)`` (open-unlearning's direction; it
    averages over every position including prompt and padding, here only answer positions count)."""
    import torch
    import torch.nn.functional as F

    from ...train.loss import IGNORE_INDEX, shift_labels

    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad():
        ref_logp = F.log_softmax(ref(**kw).logits.float(), -1)
    logp = F.log_softmax(model(**kw).logits.float(), -1)
    mask = shift_labels(batch["labels"]) != IGNORE_INDEX
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (kl * mask).sum()


class AscentMethod:
    """Base of the fine-tuning baselines: subclasses give ``forget_terms`` and their ``Config``."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    exact: ClassVar[bool] = False
    Config: ClassVar[type] = AscentConfig
    forget_reduce: ClassVar[str] = "tokens"  # "tokens" | "rows": what the forget term's sum is divided by
    needs_reference: ClassVar[bool] = False  # the forget term uses the frozen trained model

    def forget_terms(self, cfg: Any, nll: torch.Tensor, count: torch.Tensor,
                     ref_nll: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-row contributions ``r_i`` to the forget term (summed, then divided per ``forget_reduce``)."""
        raise NotImplementedError

    # -------------------------------------------------------------- objective
    @staticmethod
    def uses_retain(cfg: Any) -> bool:
        return getattr(cfg, "alpha", 0.0) > 0

    def uses_reference(self, cfg: Any) -> bool:
        return self.needs_reference or (self.uses_retain(cfg) and cfg.retain_loss == "KL")

    def forget_norm(self, rows: int, tokens: int) -> int:
        """What the forget term's sum is divided by: the batch's supervised tokens or its rows."""
        return max(tokens, 1) if self.forget_reduce == "tokens" else rows

    def loss(self, cfg: Any, model, ref, forget: dict, retain: dict | None, forget_norm: float,
             retain_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
        """One (micro-)batch's share of ``gamma F + alpha R``, with the whole batch's normalisers."""
        import torch

        nll, count = sequence_nll(model, forget)
        ref_nll = None
        if self.needs_reference:
            with torch.no_grad():
                ref_nll, _ = sequence_nll(ref, forget)
        f = self.forget_terms(cfg, nll, count, ref_nll).sum() / forget_norm
        total = getattr(cfg, "gamma", 1.0) * f
        stats = {"forget_term": float(f.detach())}
        if retain is not None and self.uses_retain(cfg):
            if cfg.retain_loss == "KL":
                r = retain_kl_sum(model, ref, retain) / retain_norm
            else:
                r = sequence_nll(model, retain)[0].sum() / retain_norm
            total = total + cfg.alpha * r
            stats["retain_term"] = float(r.detach())
        return total, stats

    def objective(self, cfg: Any, model, ref, forget: dict, retain: dict | None = None) -> torch.Tensor:
        """``gamma F + alpha R`` of one whole batch (what each optimizer step minimises)."""
        from ...train.loss import count_supervised

        r_norm = max(count_supervised(retain["labels"]), 1) if retain is not None else 1
        f_norm = self.forget_norm(forget["input_ids"].shape[0], count_supervised(forget["labels"]))
        return self.loss(cfg, model, ref, forget, retain, f_norm, r_norm)[0]

    # -------------------------------------------------------------------- run
    def run(self, session, ids: list[int], cfg: Any) -> UnlearnResult:
        t0 = time.perf_counter()
        touched = session.steps_for(ids)
        replayed = session.replayer.steps_run
        theta, _ = session.replayer.state_at(session.tau)
        recovery = session.replayer.steps_run - replayed
        model = session.model_with(theta)
        named = {n: p for n, p in model.named_parameters() if n in theta}
        for n, p in model.named_parameters():
            p.requires_grad_(n in named)
        ref = None
        if self.uses_reference(cfg):
            ref = copy.deepcopy(model).eval().requires_grad_(False)
        stats = self._optimise(session, ids, cfg, model, ref, named)
        params = {n: p.detach().clone() for n, p in named.items()}
        guard = session.retain_guard(theta, params, ids)
        info = {"method": self.name, "steps_touched": touched, "recovery_steps": recovery,
                "grad_equivalents": stats.pop("grad_equivalents"), "K": None, "hessian_mode": None,
                **stats, **guard, "diverged": None}
        info["grad_equivalents_total"] = info["grad_equivalents"] + recovery
        info["seconds"] = time.perf_counter() - t0
        return UnlearnResult(self.name, ids, session.tau, params, None, info)

    def _optimise(self, session, ids: list[int], cfg: Any, model, ref, named) -> dict[str, Any]:
        import torch
        from tqdm.auto import tqdm
        from transformers import get_scheduler

        pool = self._retain_pool(session, ids) if self.uses_retain(cfg) else []
        if self.uses_retain(cfg) and not pool:
            raise UnlearnError(f"{self.name} needs retain rows, but every training row is forgotten: use alpha=0")
        groups = self._param_groups(model, named, session.spec, cfg)
        opt = (torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
               if cfg.optimizer == "adamw" else torch.optim.SGD(groups, lr=cfg.lr, foreach=False))
        total = cfg.epochs * math.ceil(len(ids) / cfg.batch_size)
        warmup = int(cfg.warmup_epochs * len(ids) // cfg.batch_size)
        sched = get_scheduler({"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler), opt,
                              num_warmup_steps=warmup, num_training_steps=total)
        unit = float(session.trainer.plan.global_batch)
        kl_retain = self.uses_retain(cfg) and cfg.retain_loss == "KL"
        ge, history = 0.0, []
        bar = tqdm(total=total, desc=self.name, disable=not session.trainer.t.progress_bar, leave=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))  # dropout, if the model has any
            model.train()
            for f_ids, r_ids in self._batches(ids, pool, cfg):
                opt.zero_grad(set_to_none=True)
                history.append(self._accumulate(session.trainer.dataset, cfg, model, ref, f_ids, r_ids))
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
                opt.step()
                sched.step()
                ref_rows = len(f_ids) * self.needs_reference + len(r_ids) * kl_retain
                ge += (len(f_ids) + len(r_ids) + FORWARD_COST * ref_rows) / unit
                bar.update(1)
        bar.close()
        model.eval()
        return {"grad_equivalents": ge, "updates": len(history), "epochs": cfg.epochs,
                "lrs": [float(gr["initial_lr"]) for gr in opt.param_groups], "warmup_steps": warmup,
                "objective_first": history[0]["objective"], "objective_last": history[-1]["objective"],
                "forget_term_first": history[0]["forget_term"], "forget_term_last": history[-1]["forget_term"],
                "retain_term_last": history[-1]["retain_term"] if pool else None,
                "retain_pool_rows": len(pool), "seed": cfg.seed,
                "cost_convention": "1 = forward+backward over one training step's batch; forward-only = 1/3"}

    @staticmethod
    def _batches(ids: list[int], pool: list[int], cfg: Any):
        """(forget ids, retain ids) per optimizer step: the forget rows reshuffled every epoch, each
        paired with a retain row drawn uniformly with replacement; a pure function of ``cfg.seed``."""
        import torch

        g = torch.Generator().manual_seed(int(cfg.seed))
        for _ in range(cfg.epochs):
            order = [ids[int(i)] for i in torch.randperm(len(ids), generator=g)]
            for k in range(0, len(order), cfg.batch_size):
                f_ids = order[k:k + cfg.batch_size]
                draw = torch.randint(len(pool), (len(f_ids),), generator=g).tolist() if pool else []
                yield f_ids, [pool[i] for i in draw]

    def _accumulate(self, ds, cfg: Any, model, ref, f_ids: list[int], r_ids: list[int]) -> dict[str, float]:
        """Backward of one step's objective, micro-batch by micro-batch, with the whole step's normalisers."""
        from ...data.collate import Collator

        collate = Collator(ds.pad_token_id)
        f_norm = self.forget_norm(len(f_ids), sum(ds.supervised_tokens(i) for i in f_ids))
        r_norm = max(sum(ds.supervised_tokens(i) for i in r_ids), 1)
        step = {"objective": 0.0, "forget_term": 0.0, "retain_term": 0.0}
        mb = cfg.micro_batch_size
        for m in range(0, len(f_ids), mb):
            fb = collate([ds[i] for i in f_ids[m:m + mb]])
            rb = collate([ds[i] for i in r_ids[m:m + mb]]) if r_ids else None
            loss, parts = self.loss(cfg, model, ref, fb, rb, f_norm, r_norm)
            loss.backward()
            step["objective"] += float(loss.detach())
            for key, value in parts.items():
                step[key] += value
        return step

    @staticmethod
    def _retain_pool(session, ids: list[int]) -> list[int]:
        """Training rows that are neither forgotten now nor excluded from training before."""
        gone = set(ids) | {int(i) for i in session.trainer.t.exclude_ids}
        for rec in session.log.records():
            gone.update(rec.excluded)
        return [i for i in range(len(session.trainer.dataset)) if i not in gone]

    @staticmethod
    def _param_groups(model, named: dict[str, torch.nn.Parameter], spec, cfg: Any) -> list[dict]:
        """One group per (recorded param group, decay or not); the HF Trainer's no-decay rule."""
        import torch
        from transformers.trainer_pt_utils import get_parameter_names

        decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
        base = {n: g.base_lr for g in spec.groups for n in g.names}
        groups: dict[tuple[float, bool], list] = {}
        for n, p in named.items():
            lr = cfg.lr * base[n] if cfg.lr_relative else cfg.lr
            groups.setdefault((lr, n in decay), []).append(p)
        return [{"params": ps, "lr": lr, "weight_decay": cfg.weight_decay if dec else 0.0}
                for (lr, dec), ps in groups.items()]
