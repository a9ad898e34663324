import pytest

from lmcleaner.data import DataError, TextDataset, embedded_tokenizer, load_records
from lmcleaner.data.labels import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture
def plain_tok():
    t = embedded_tokenizer()
    t.chat_template = None
    return t


def supervised_text(tok, ex):
    return tok.decode([i for i in ex["labels"] if i != IGNORE_INDEX])


RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                              {"role": "assistant", "content": "Rome."}]},
    "conversations": {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]},
    "prompt_response": {"prompt": "Capital of France?", "response": "Paris."},
    "question_answer": {"question": "Capital of France?", "answer": "Paris."},
}


@pytest.mark.parametrize("kind", list(RECORDS))
def test_only_assistant_tokens_carry_loss(tok, kind):
    ds = TextDataset([RECORDS[kind]], tok, max_length=128)
    sup = supervised_text(tok, ds[0])
    assert "Paris." in sup
    assert "France" not in sup and "<|user|>" not in sup
    full = tok.decode(ds[0]["input_ids"])
    assert "Capital of France?" in full and full.startswith("<s>")
    if kind == "messages":
        assert "Rome." in sup and "Italy" not in sup and "Be brief" not in sup


@pytest.mark.parametrize("kind", list(RECORDS))
def test_plain_template_when_no_chat_template(plain_tok, kind):
    ds = TextDataset([RECORDS[kind]], plain_tok, max_length=128)
    full = plain_tok.decode(ds[0]["input_ids"])
    assert "Question: Capital of France?\nAnswer: Paris." in full
    assert supervised_text(plain_tok, ds[0]).strip() == "Paris.</s>" or "Paris.</s>" in supervised_text(plain_tok, ds[0])
    assert "Question" not in supervised_text(plain_tok, ds[0])


def test_multi_field(tok):
    rec = {"instruction": "Translate", "input": "chat", "output": "cat"}
    ds = TextDataset([rec], tok, text_field=["instruction", "input", "output"], max_length=64)
    full, sup = tok.decode(ds[0]["input_ids"]), supervised_text(tok, ds[0])
    assert "Instruction: Translate" in full and "Input: chat" in full
    assert "cat" in sup and "Translate" not in sup


def test_pretraining_all_tokens_supervised(tok):
    ds = TextDataset([{"text": "hello world"}], tok, training_mode="pretraining", max_length=64)
    ex = ds[0]
    assert ex["labels"][0] == IGNORE_INDEX  # BOS
    assert ex["labels"][1:] == ex["input_ids"][1:]


def test_truncation(tok):
    ds = TextDataset([{"text": "word " * 200}], tok, training_mode="pretraining", max_length=16)
    assert len(ds[0]["input_ids"]) == 16 == len(ds[0]["labels"])


def test_unknown_text_field(tok):
    with pytest.raises(DataError, match="text_field 'nope'"):
        TextDataset([{"question": "q", "answer": "a"}], tok, text_field="nope")
    with pytest.raises(DataError, match="text_field 'body'"):
        TextDataset([{"text": "x"}], tok, training_mode="pretraining", text_field="body")


def test_generation_prompt_matches_training_prefix(tok, plain_tok):
    from lmcleaner.data import encode_prompt, prompt_text

    for t in (tok, plain_tok):
        ds = TextDataset([RECORDS["question_answer"]], t, max_length=64)
        prompt = encode_prompt(t, prompt_text(t, "Capital of France?"))
        assert ds[0]["input_ids"][: len(prompt)] == prompt
        first_sup = next(i for i, x in enumerate(ds[0]["labels"]) if x != IGNORE_INDEX)
        assert first_sup == len(prompt)


def test_load_local_files(tmp_path, tok):
    import json

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(5)))
    assert load_records(str(tmp_path / "d.jsonl")) == rows
    assert len(load_records(str(tmp_path / "d.csv"), num_samples=3)) == 3
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError):
        load_records(str(tmp_path / "empty.jsonl"))
