"""The project's own pretrained base: generated corpus, cache, and fine-tuning from it."""

import json

import pytest

from lmcleaner.cli.main import main
from lmcleaner.config.schema import PretrainConfig
from lmcleaner.data.pretrain_corpus import PRE_FIRST, PRE_LAST, generate_pretraining_corpus
from lmcleaner.data.synthetic import FIRST, LAST, generate_authors_qa
from lmcleaner.train.pretrain import base_dir, ensure_base_model, resolve_base


def test_corpus_entities_are_disjoint_from_fine_tuning_authors():
    assert not set(PRE_FIRST) & set(FIRST) and not set(PRE_LAST) & set(LAST)
    rows = generate_pretraining_corpus(num_entities=50, seed=3)
    text = " ".join(r["text"] for r in rows)
    authors = {r["author"] for r in generate_authors_qa(num_authors=200, num_holdout_authors=20)["full"]}
    assert not any(a in text for a in authors)
    assert rows == generate_pretraining_corpus(num_entities=50, seed=3)  # deterministic


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return PretrainConfig(model="micro-llama", steps=30, batch_size=8, num_entities=40,
                          cache_dir=str(tmp_path_factory.mktemp("cache")), progress_bar=False)


def test_base_is_built_once_and_cached_by_its_settings(small):
    path = ensure_base_model(small)
    info = json.loads((path / "lmcleaner_base.json").read_text())
    assert (path / "model.safetensors").is_file() and info["final_loss"] < info["first_loss"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(small) == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    other = PretrainConfig(**{**small.__dict__, "steps": 31})
    assert base_dir(other) != path  # another recipe, another cache entry
    assert base_dir(PretrainConfig(**{**small.__dict__, "threads": 2, "progress_bar": True})) == path


def test_fine_tuning_from_the_base_and_cli(small, tmp_path, capsys):
    rc = main(["pretrain", "pretrain.model=micro-llama", "pretrain.steps=30", "pretrain.batch_size=8",
               "pretrain.num_entities=40", f"pretrain.cache_dir={small.cache_dir}", "pretrain.progress_bar=false"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["built"] is False and out["base_dir"] == str(ensure_base_model(small))
    from lmcleaner.config import load_config
    from lmcleaner.train import Trainer

    cfg = load_config(overrides=["model=micro-llama", f"model.name_or_path={out['base_dir']}",
                                 "model.tokenizer=embedded", "training.max_steps=3", "training.num_samples=16",
                                 "training.progress_bar=false", f"training.output_dir={tmp_path / 'ft'}"])
    state = Trainer(cfg).train()
    assert state.step == 3
    assert resolve_base("some/dir") == "some/dir"
