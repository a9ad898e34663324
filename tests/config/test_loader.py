import pytest

from lmcleaner.config import ConfigError, available_presets, load_config


def test_defaults_and_overrides():
    cfg = load_config(overrides=["training.max_steps=50", "model=micro-llama", "trainer=LMCleanerSample",
                                 "trainer.method_args.K=7", "training.exclude_ids=[1,2]"])
    assert cfg.training.max_steps == 50
    assert cfg.model.hidden_size == 16
    assert cfg.trainer.handler == "LMCleanerSample"  # canonicalised by the method registry
    assert cfg.trainer.method_args.K == 7
    assert list(cfg.training.exclude_ids) == [1, 2]


def test_original_field_names_exist():
    t = load_config().training
    for name in ["memory_lr", "lora_lr", "base_model_lr", "training_mode", "dataset_name", "dataset_subset",
                 "dataset_split", "text_field", "max_length", "distributed_strategy", "num_gpus",
                 "fsdp_sharding_strategy", "batch_size", "gradient_accumulation_steps", "max_steps", "warmup_steps",
                 "optimizer", "weight_decay", "max_grad_norm", "scheduler", "mixed_precision", "save_precision",
                 "gradient_checkpointing", "save_steps", "eval_steps", "save_total_limit", "save_best_model",
                 "early_stopping", "early_stopping_patience", "early_stopping_threshold", "logging_steps",
                 "log_to_wandb", "output_dir", "resume_from_checkpoint", "seed", "num_epochs", "num_samples"]:
        assert name in t, name


def test_yaml_file_then_overrides_win(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("training:\n  max_steps: 9\n  learning_rate: 0.5\n")
    cfg = load_config(f, ["training.max_steps=3"])
    assert cfg.training.max_steps == 3 and cfg.training.learning_rate == 0.5


@pytest.mark.parametrize("override, needle", [
    ("training.foo=1", "training.foo"),
    ("training.max_steps=abc", "training.max_steps"),
    ("training.optimizer=lion", "optimizer"),
    ("training.scheduler=warp", "scheduler"),
    ("training.max_length=4", "max_length"),
    ("training_logger.max_steps=0", "training_logger.max_steps"),
    ("model=nope", "model preset"),
    ("justakey", "key=value"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("training:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="training.bogus"):
        load_config(f)


def test_presets_listed():
    assert {"micro-llama", "tiny-llama"} <= set(available_presets("model"))
