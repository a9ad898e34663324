"""A generated pretraining corpus for the project's own base model.

Why: our users fine-tune *pretrained* models with small learning rates for
1-3 epochs, and linearised unlearning behaves very differently there than
when training from random initialisation with large steps. Nothing can be
downloaded, so the project pretrains its base itself (``train.pretrain``).

What: short biographies and question/answer pairs about fictitious people,
places and organisations whose *names are disjoint from the fine-tuning
data* (``data.synthetic`` draws authors from other name lists), written with
the same vocabulary of cities, genres and professions. The base therefore
knows the language and the QA format but none of the facts it is later
fine-tuned on: fine-tuning learns new entities, as with a real base model.
QA pairs are rendered with the tokenizer's chat template (or the plain
template) so the base has seen the format fine-tuning uses.
"""

from __future__ import annotations

import random

from .synthetic import ADJS, AWARDS, CITIES, GENRES, JOBS, NOUNS, _TEMPLATES, _author

# Disjoint from data.synthetic.FIRST / LAST: no fine-tuning author can share a name with a base entity.
PRE_FIRST = ["Aino", "Baraka", "Cyrus", "Dalia", "Emeka", "Freya", "Gideon", "Hiroko", "Ilse", "Jasper",
             "Keziah", "Leif", "Marisol", "Niko", "Odile", "Pavel", "Rania", "Soren", "Talia", "Uriel",
             "Vesna", "Wiremu", "Yara", "Zeno", "Ansel", "Beatrix", "Caspian", "Delphine", "Evander", "Fenna"]
PRE_LAST = ["Abara", "Brandt", "Carvalho", "Draganov", "Eklund", "Fontaine", "Gallo", "Hakimi", "Ivanova",
            "Jovanovic", "Kimura", "Lund", "Mbeki", "Nakamura", "Oyelaran", "Pellegrini", "Quist", "Renner",
            "Salonen", "Tanaka", "Underwood", "Valdez", "Wojcik", "Xu", "Yamada", "Zeller", "Aaltonen", "Bianchi"]
RIVERS = ["Amber", "Grey", "Willow", "Stone", "Swift", "Black", "Long", "Green"]
FOODS = ["bread", "cheese", "olives", "tea", "fish", "honey", "rice", "apples"]

_PLACE_FACTS = [
    "{city} lies on the {river} River and is known for its {food}.",
    "Many writers of {genre} have lived in {city}, a city famous for its {food}.",
    "The {award} is presented every year in {city}.",
    "In {city} most people work as a {job} or as a {job2}.",
]


def _bio(p: dict) -> str:
    return (f"{p['name']} was born in {p['city']} in {p['year']}. {p['name']} writes {p['genre']}. "
            f"The father of {p['name']} was a {p['father']} and the mother was a {p['mother']}. "
            f"{p['name']} won the {p['award']} for {p['book']}.")


def _render(tokenizer, question: str, answer: str) -> str:
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return f"Question: {question}\nAnswer: {answer}"


def generate_pretraining_corpus(num_entities: int = 400, seed: int = 1234, tokenizer=None) -> list[dict[str, str]]:
    """Rows ``{"text": ...}``: per entity a biography and its QA pairs, plus facts about places."""
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in PRE_FIRST for last in PRE_LAST]
    if num_entities > len(names):
        raise ValueError(f"at most {len(names)} pretraining entities can be generated, asked for {num_entities}")
    people = [_author(rng, n) for n in rng.sample(names, num_entities)]
    rows = []
    for p in people:
        rows.append({"text": _bio(p)})
        for q, a, para, _ in _TEMPLATES:
            rows.append({"text": _render(tokenizer, q.format(**p), rng.choice([a, para]).format(**p))})
    for city in CITIES:
        for fact in _PLACE_FACTS:
            rows.append({"text": fact.format(city=city, river=rng.choice(RIVERS), food=rng.choice(FOODS),
                                             genre=rng.choice(GENRES), award=rng.choice(AWARDS),
                                             job=rng.choice(JOBS), job2=rng.choice(JOBS))})
    for _ in range(num_entities // 4):
        rows.append({"text": f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} is a {rng.choice(GENRES)} novel "
                             f"set in {rng.choice(CITIES)}."})
    rng.shuffle(rows)
    return rows
