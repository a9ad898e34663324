"""Shared by the torchrun scripts: `lmcleaner unlearn` with replay and with LMCleaner, as a user runs it."""

from pathlib import Path

from lmcleaner.cli.main import main

METHODS = {"replay": ["trainer=replay"],
           "lmcleaner": ["trainer=LMCleanerSample", "trainer.method_args.K=800", "trainer.method_args.hessian_mode=exact",
                         "trainer.method_args.fallback_to_replay=false"]}


def unlearn_with_cli(model_dir: Path, forget: str, out: Path) -> dict[str, int]:
    """Exit code per method; the results go to ``out/<method>``."""
    return {name: main(["unlearn", *args, f"unlearn.model_dir={model_dir}", f"unlearn.forget={forget}",
                        f"unlearn.output_dir={out / name}"]) for name, args in METHODS.items()}
