"""``lmcleaner pretrain``: build (or find) the project's cached base model."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  lmcleaner pretrain                                  # the default base of model=tiny-llama (cached)
  lmcleaner pretrain pretrain.steps=3000 pretrain.model=micro-llama
  lmcleaner train model.name_or_path=base:tiny-llama  # fine-tune from the default base (built on first use)
keys: pretrain.{model, steps, batch_size, learning_rate, num_entities, max_length, seed, cache_dir, threads}
Prints JSON with the directory (a from_pretrained model + tokenizer) and whether it was built now."""


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the project's own base model on generated text (cached)",
                       description="Pretrain an embedded model preset on a generated corpus of entities disjoint "
                                   "from the fine-tuning data, so that fine-tuning runs start from a pretrained "
                                   "base (the regime of real users). Cached by its settings; built once.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file merged over the defaults")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.add_argument("overrides", nargs="*", help="pretrain.* overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from omegaconf import OmegaConf

    from ..config import load_config
    from ..config.schema import PretrainConfig
    from ..train.pretrain import base_dir, check_settings, ensure_base_model

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg.pretrain))
        return 0
    pcfg = PretrainConfig(**OmegaConf.to_container(cfg.pretrain))
    check_settings(pcfg)
    existed = (base_dir(pcfg) / "config.json").is_file()
    path = ensure_base_model(pcfg)
    info = json.loads((path / "lmcleaner_base.json").read_text())
    print(json.dumps({"base_dir": str(path), "built": not existed, "steps": pcfg.steps,
                      "first_loss": info.get("first_loss"), "final_loss": info.get("final_loss")}))
    return 0
