"""Record an unlearnable trajectory from an existing Hugging Face ``Trainer`` or TRL ``SFTTrainer`` script.

Two lines change in the script::

    from lmcleaner.integrations import RecordingTrainer      # instead of transformers.Trainer
    trainer = RecordingTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                               processing_class=tokenizer, record_dir="runs/x/lmcleaner")
    trainer.train()

    # TRL: any Trainer subclass
    from lmcleaner.integrations import recording
    trainer = recording(SFTTrainer)(model=model, args=sft_config, train_dataset=ds, processing_class=tokenizer,
                                    record_dir="runs/x/lmcleaner")

and afterwards ``lmcleaner unlearn trainer=replay unlearn.model_dir=runs/x/lmcleaner unlearn.forget=17,203``
(or ``trainer=LMCleanerSample``) works on the recorded run exactly as on a run of ``lmcleaner train``.

See :mod:`lmcleaner.integrations.hf` for what the recorder takes over and what it refuses.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LMCleanerRecorderMixin", "RecordingError", "RecordingTrainer", "TrajectoryCallback", "recording"]


def __getattr__(name: str) -> Any:
    # transformers is imported only when the integration is used.
    if name in __all__:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(name)
