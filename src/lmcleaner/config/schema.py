"""Typed configuration schema. The docstrings are the documentation.

Field names of the ``training:`` and ``training_logger:`` blocks follow the
original LMCleaner system so its users find their way. Every block is a
dataclass; OmegaConf builds a structured config from them, so an unknown key
or a wrong type is an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    """Which model to fine-tune.

    ``name_or_path``: ``"tiny-llama"`` builds the embedded default (a 2-layer
    Llama from a ``transformers`` config, no download), ``"tiny-mixtral"`` the
    same shape as a Mixtral mixture of experts (``num_local_experts``,
    ``num_experts_per_tok``); a ``*.json`` path is a ``transformers`` config
    built with fresh seeded weights (tokenizer: the embedded one unless
    ``tokenizer`` says otherwise; a config that ships code is refused unless
    trusted, like a model directory); ``"base:<preset>"`` the project's
    pretrained base (``train.pretrain``); anything else is passed to
    ``AutoModelForCausalLM.from_pretrained`` (hub id or local directory).
    """

    name_or_path: str = "tiny-llama"
    tokenizer: Optional[str] = None  # default: same as name_or_path; "embedded" = shipped tokenizer
    attn_implementation: str = "eager"  # eager: the curvature path needs forward-mode AD (no flash SDPA on CPU)
    dtype: str = "float32"  # weights dtype at load: float32|bfloat16|float16
    trust_remote_code: bool = False
    # Shape of the embedded tiny Llama (ignored for pretrained models).
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    num_local_experts: int = 4  # tiny-mixtral: experts per MoE layer
    num_experts_per_tok: int = 2  # tiny-mixtral: router top-k


@dataclass
class LoraConfig:
    """LoRA adapters through ``peft``; only adapter weights are trained.

    ``target_modules``: module names to adapt; unset, the known targets of the
    model type (peft's table: ``q_proj, v_proj`` for Llama, ``c_attn`` for
    GPT-2, ...), or every linear layer (``all-linear``) for other types. A name
    that matches nothing is a one-line error listing the model's linear modules.
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None


@dataclass
class OnlineUnlearningConfig:
    """How deletion requests that arrive *during* training are applied (``training.online_unlearning``).

    Requests come from ``training.forget_request_file`` (lines
    ``{"request_id": "r1", "ids": [17]}`` appended while the run trains) or
    ``Trainer.request_forget``. ``method``: ``auto`` (exact replay unless an
    approximation's own estimate is within its ``max_error``; the recommended one),
    ``replay`` (exact: the run ends bit-identical to retraining without them),
    ``LMCleanerSample`` / ``LMCleanerBatch`` (a correction, then the ids are excluded
    from later batches), or ``rollback`` / ``sgd_formula``; unset, a request stops
    training with an error.
    """

    method: Optional[str] = None
    # Passed to the method only when set and only if it takes them; unset: the method's own default
    # (LMCleaner: K=800, exact, 1e-4; auto: K=40 is its *first window*, so LMCleaner's 800 would
    # make online auto always answer with replay).
    K: Optional[int] = None  # LMCleaner: propagation window; auto: first window
    hessian_mode: Optional[str] = None  # exact | GGN | diag
    damping: Optional[float] = None


@dataclass
class TrainingConfig:
    """The training run (names as in the original system)."""

    training_mode: str = "instruction_finetuning"  # pretraining | instruction_finetuning
    dataset_name: str = "embedded"  # "embedded" | local json/jsonl/parquet/csv path | hub dataset name
    dataset_subset: Optional[str] = None
    dataset_split: str = "train"
    text_field: Any = None  # pretraining: "text"; instruction: auto-detect, a field name, or a list of fields
    validation_dataset: Optional[str] = None  # "embedded" holdout, a path, or None (no eval)
    validation_split: str = "train"
    max_length: int = 128
    num_samples: Optional[int] = None  # keep the first N rows
    seed: int = 42
    num_epochs: int = 10
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = 8  # per process, per micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    memory_lr: Optional[float] = None  # params whose name contains "memory"
    lora_lr: Optional[float] = None  # params whose name contains "lora_"
    base_model_lr: Optional[float] = None  # everything else (default: learning_rate)
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_exclude: list[str] = field(default_factory=list)  # parameter names trained without weight decay (HF Trainer's bias/norm rule; set by lmcleaner.integrations)
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 20
    mixed_precision: str = "no"  # no | fp16 | bf16
    save_precision: str = "float32"  # dtype of the exported model weights
    gradient_checkpointing: bool = False
    # several processes (torchrun): ddp replicates the model; fsdp shards it with FSDP2 through Accelerate
    # (sharded safetensors checkpoints, gathered export; recorder storage=light). One process ignores it.
    distributed_strategy: str = "ddp"  # ddp | fsdp
    num_gpus: int = 0  # informational; the launcher decides the number of processes
    fsdp_sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD (ZeRO-3) | SHARD_GRAD_OP (ZeRO-2)
    save_steps: int = 0  # 0: no intermediate checkpoints (the recorder may still ask for them)
    eval_steps: int = 0  # 0: no periodic eval
    save_total_limit: Optional[int] = None  # keep at most N checkpoints (the recorder's window is protected)
    save_best_model: bool = False
    metric_for_best_model: str = "eval_loss"
    early_stopping: bool = False
    early_stopping_patience: int = 3
    early_stopping_threshold: float = 0.0
    logging_steps: int = 10
    log_to_wandb: bool = False
    output_dir: str = "outputs/run"
    resume_from_checkpoint: Optional[str] = None  # a checkpoint dir, or "latest"
    exclude_ids: list[int] = field(default_factory=list)  # samples removed from every batch (exact retrain)
    forget_request_file: Optional[str] = None  # online deletion requests, checked between steps
    online_unlearning: OnlineUnlearningConfig = field(default_factory=OnlineUnlearningConfig)  # how they are applied
    router_aux_loss: bool = True  # add router losses when the model returns router logits
    load_balance_coef: float = 0.01
    auxiliary_coef: float = 0.0
    z_loss_coef: float = 0.0
    progress_bar: bool = True
    torch_threads: int = 0  # intra-op CPU threads (0: torch's default); tiny models run fastest with 1


@dataclass
class TrainingLoggerConfig:
    """The training-trajectory recorder (DESIGN §2)."""

    enabled: bool = True
    log_dir: Optional[str] = None  # default: <output_dir>/training_log
    storage: str = "light"  # light | heavy | diag
    mode: str = "batch"  # batch | sample
    max_steps: int = 1000  # the unlearning window, in steps
    save_interval: int = 10  # flush every N steps
    checkpoint_interval: int = 50  # light mode: parameter+optimizer checkpoint spacing C (replay cost ~C/2 steps; 50 keeps recorder throughput >= 0.96)
    save_batch_data: bool = False  # heavy: store batch tensors
    save_indices_only: bool = True
    save_rng_state: bool = True
    compute_diag_h: bool = False
    batch_size_at_training: Optional[int] = None
    tensor_dtype: str = "float32"  # heavy mode update vectors
    diag_estimator: str = "hutchinson"  # diag: hutchinson (z*Hz, Rademacher z) | empirical_fisher (g*g of the step)
    diag_probes: int = 1  # diag/hutchinson: probe vectors per step


def _session_method_args() -> dict[str, Any]:
    return {"training_log_dir": None, "apply_immediately": True, "audit_dir": None, "fallback_to_replay": True}


@dataclass
class UnlearnTrainerConfig:
    """Which unlearning method and its arguments.

    ``handler`` (or ``trainer=NAME``): a registered method, see
    ``lmcleaner unlearn --help`` or ``lmcleaner.unlearn.registry``.
    ``method_args``: the method's own arguments (its ``Config`` dataclass in
    ``lmcleaner/unlearn/handlers/``, e.g. ``K``, ``hessian_mode`` for
    LMCleaner; checked against it, unknown keys are an error) plus the
    session keys every method shares:

    - ``training_log_dir``: the trajectory log (default: ``<run>/training_log``);
    - ``apply_immediately``: write the unlearned model (else only the correction);
    - ``audit_dir``: where the audit log goes (default: ``<output>/audit``);
    - ``fallback_to_replay``: a correction the divergence guard flags is
      replaced by exact replay;
    - ``certify``: ``{epsilon, delta, subspace_rank, bound, ...}`` adds Gaussian
      noise for an (epsilon, delta) guarantee (``unlearn/certify``,
      ``docs/certification.md``); absent: no noise.
    """

    handler: str = "auto"  # per request: an approximation when its estimated error is small enough, else replay
    method_args: dict[str, Any] = field(default_factory=_session_method_args)


@dataclass
class UnlearnConfig:
    """What to forget and where to write the result.

    ``export``: ``merged`` writes a ``from_pretrained`` model directory (LoRA
    merged into the base); ``adapter`` (LoRA runs only) writes the unlearned
    LoRA adapter for ``peft.PeftModel.from_pretrained(base, dir)``.
    """

    forget: Any = None  # list of ids, "17,203", a file of ids, or a dataset file matched to training rows
    # a JSONL file of requests ({"request_id": "r1", "ids": [17]} per line), answered by one joint
    # computation with one audit record each (instead of forget; unlearn/requests.py)
    requests: Optional[str] = None
    model_dir: Optional[str] = None  # trained run dir (default: training.output_dir)
    output_dir: Optional[str] = None  # default: a fresh <run>/unlearned-<method>[-N] (retrain: <run>/retrain[-N])
    overwrite: bool = False  # replace an existing output_dir (its audit records are kept); never the source run
    max_error: Optional[float] = None  # trainer=auto: accepted estimated relative error (default: the method's 0.1)
    export: str = "merged"  # merged | adapter (LoRA runs)


@dataclass
class DemoConfig:
    """``lmcleaner demo``: the whole story on the embedded default, scalable."""

    steps: int = 200  # training steps of the recorded run
    model: str = "tiny-llama"  # model preset (conf/model/*.yaml) or a YAML path
    data: str = "embedded"  # "embedded" or a QA json/jsonl path (question/answer rows)
    forget_authors: list[int] = field(default_factory=lambda: [0])  # embedded data: authors to forget
    forget_ids: list[int] = field(default_factory=list)  # explicit sample ids (overrides forget_authors)
    # pretrained: fine-tune the project's own pretrained base (`lmcleaner pretrain`, built once and cached),
    # the regime of real users; scratch: train the preset from random initialisation
    init: str = "pretrained"
    optimizer: str = "adamw"
    learning_rate: float = 3e-4  # a fine-tuning rate (scratch runs were measured at 1e-3)
    max_grad_norm: float = 0.0  # clipping is modelled too; >0 makes the regime more nonlinear (larger errors)
    Ks: list[int] = field(default_factory=lambda: [20])  # truncation windows besides the full window
    hessian_modes: list[str] = field(default_factory=lambda: ["exact", "GGN"])
    out_dir: str = "demo_out"
    eval_max_new_tokens: int = 24
    eval_max_retain: int = 48
    eval_max_holdout: int = 32
    threads: int = 1  # torch intra-op threads for the demo (1 is fastest for the tiny default model)
    # certified removal section (docs/certification.md): epsilons besides inf (empty: no section) and
    # where the residual bound comes from (formal | formal_lipschitz | empirical | empirical_subspace)
    certify_epsilons: list[float] = field(default_factory=lambda: [1.0, 8.0])
    certify_variants: list[str] = field(default_factory=lambda: ["formal", "empirical"])


@dataclass
class PretrainConfig:
    """``lmcleaner pretrain``: the project's own base model (``train.pretrain``).

    Pretrains an embedded model preset on a generated corpus of entities
    disjoint from the fine-tuning data, cached by these settings; fine-tune
    from it with ``model.name_or_path=base:tiny-llama``.
    """

    model: str = "tiny-llama"  # model preset (conf/model) or YAML of an embedded (config-built) model
    steps: int = 1200  # optimizer steps of pretraining
    batch_size: int = 16
    learning_rate: float = 3e-3
    num_entities: int = 400  # fictitious people in the corpus (13 texts each, plus places and books)
    max_length: int = 128
    seed: int = 1234
    cache_dir: Optional[str] = None  # default: $LMCLEANER_CACHE, $XDG_CACHE_HOME/lmcleaner or ~/.cache/lmcleaner
    progress_bar: bool = True
    threads: int = 1  # intra-op threads while pretraining (tiny models: 1 is fastest)


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training_logger: TrainingLoggerConfig = field(default_factory=TrainingLoggerConfig)
    trainer: UnlearnTrainerConfig = field(default_factory=UnlearnTrainerConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    telemetry_config: Optional[str] = None  # YAML for lmcleaner.telemetry (default config when None)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form user keys (demo, eval, sweeps)
