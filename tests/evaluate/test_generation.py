"""Greedy generation with left padding, stop tokens and ROUGE-L recall."""

import pytest

from lmcleaner.data import encode_prompt, prompt_text
from lmcleaner.evaluate.generation import (
    generate_answers, greedy_generate, left_pad, rouge_l_recall, stop_token_ids,
)
from lmcleaner.evaluate.scoring import pad_id

QUESTIONS = ["Where was Amara Okonkwo born?", "Who wrote The Silent River?",
             "What genre does Bjorn Lindqvist write, and which award did the author win in the end?"]


def test_rouge_l_recall_known_strings():
    # reference 4 words, LCS 3 ("the", "cat", "sat") -> 0.75; stemming makes "sitting" ~ "sit"
    assert rouge_l_recall(["the cat sat down"], ["the cat quietly sat"]) == [pytest.approx(0.75)]
    assert rouge_l_recall(["cats are sitting"], ["cat is sitting"]) == [pytest.approx(2 / 3)]
    assert rouge_l_recall(["exact match"], ["exact match"]) == [1.0]
    assert rouge_l_recall(["something"], [""]) == [0.0]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stop_tokens_include_eos_and_end_of_turn(tokenizer):
    stops = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in stops
    assert tokenizer.convert_tokens_to_ids("<|end|>") in stops


def test_batched_left_padded_generation_equals_unbatched(llama, tokenizer):
    prompts = [encode_prompt(tokenizer, prompt_text(tokenizer, q)) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    batched = greedy_generate(llama, prompts, max_new_tokens=8, batch_size=3, pad_token_id=pad_id(tokenizer))
    single = [greedy_generate(llama, [p], max_new_tokens=8, pad_token_id=pad_id(tokenizer))[0] for p in prompts]
    assert batched == single
    assert all(len(t) == 8 for t in single)  # no stop ids given: runs to max_new_tokens


def test_generation_stops_at_stop_token(llama, tokenizer):
    prompt = encode_prompt(tokenizer, prompt_text(tokenizer, QUESTIONS[0]))
    full = greedy_generate(llama, [prompt], max_new_tokens=6, pad_token_id=pad_id(tokenizer))[0]
    # declare the 3rd generated token a stop token: output is cut before its first occurrence
    cut = greedy_generate(llama, [prompt], max_new_tokens=6, pad_token_id=pad_id(tokenizer), stop_ids=[full[2]])[0]
    assert cut == full[:full.index(full[2])]


def test_generate_answers_decodes_text(llama, tokenizer):
    texts = generate_answers(llama, tokenizer, QUESTIONS[:2], max_new_tokens=4, batch_size=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert not any("<|end|>" in t or "<pad>" in t for t in texts)
