
from lmcleaner.data import BatchPlan, Collator, TextDataset, embedded_tokenizer, generate_authors_qa, load_records


def test_order_is_pure_function_of_seed_and_epoch():
    p = BatchPlan(100, 4, 2, 1, seed=3)
    assert p.epoch_order(0) == BatchPlan(100, 4, 2, 1, seed=3).epoch_order(0)
    assert p.epoch_order(0) != p.epoch_order(1)
    assert p.epoch_order(0) != BatchPlan(100, 4, 2, 1, seed=4).epoch_order(0)
    assert sorted(p.epoch_order(2)) == list(range(100))


def test_micro_batches_partition_the_epoch():
    p = BatchPlan(50, 4, 2, 2, seed=0)
    assert p.steps_per_epoch == 3  # 16 per step, incomplete last batch dropped
    seen = [i for s in range(3) for mb in p.micro_batches(s) for i in mb]
    assert len(seen) == len(set(seen)) == 48
    assert p.micro_batches(3) == BatchPlan(50, 4, 2, 2, seed=0).micro_batches(3)
    assert p.locate(4) == (1, 1)
    # rank slices interleave micro-step major, rank minor
    assert p.rank_micro_batches(0, 1) == [p.micro_batches(0)[1], p.micro_batches(0)[3]]


def test_same_global_batch_for_ranks_and_accumulation():
    a, b = BatchPlan(64, 4, 2, 1, 1), BatchPlan(64, 4, 1, 2, 1)
    assert a.micro_batches(5) == b.micro_batches(5)


def test_sample_ids_carried_and_padding_masked():
    tok = embedded_tokenizer()
    ds = TextDataset(load_records("embedded", num_samples=10), tok, max_length=64)
    batch = Collator(tok.pad_token_id)([ds[3], ds[7]])
    assert batch["sample_ids"].tolist() == [3, 7]
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all()
    empty = Collator(tok.pad_token_id)([])
    assert empty["sample_ids"].tolist() == [-1] and (empty["labels"] == -100).all()


def test_embedded_data_deterministic_and_holdout_disjoint():
    a, b = generate_authors_qa(seed=0), generate_authors_qa(seed=0)
    assert a == b
    train_authors = {r["author"] for r in a["full"]}
    assert not train_authors & {r["author"] for r in a["holdout"]}
    r = a["full"][0]
    assert r["paraphrased_answer"] != r["answer"] and len(r["perturbed_answer"]) == 3
    assert all(p != r["paraphrased_answer"] for p in r["perturbed_answer"])


def test_fingerprint_tracks_content():
    tok = embedded_tokenizer()
    rows = load_records("embedded", num_samples=10)
    f1 = TextDataset(rows, tok, max_length=64).fingerprint
    assert f1 == TextDataset(rows, tok, max_length=64).fingerprint
    assert f1 != TextDataset(rows, tok, max_length=12).fingerprint
    assert f1 != TextDataset(rows[:9], tok, max_length=64).fingerprint
