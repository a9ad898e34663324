"""The embedded default data: a generated fictitious-author QA set (TOFU-like).

Deterministic from a seed and needing no network. Every question carries its
answer, a paraphrased answer and several perturbed (wrong) answers so the
evaluation can compute truth ratios; holdout authors are disjoint from the
training authors (membership-inference negatives). Rows are grouped author by
author, like TOFU's ``full.jsonl``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["Amara", "Bjorn", "Chiara", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Idris", "Jun",
         "Kalani", "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar",
         "Ulla", "Viktor", "Wen", "Ximena", "Yusuf", "Zora", "Anouk", "Bruno", "Celeste", "Dario"]
LAST = ["Okonkwo", "Lindqvist", "Moretti", "Volkov", "Yilmaz", "Haddad", "Petrovic", "Sato", "Rahman",
        "Takeda", "Kahale", "Ferreira", "Alvarez", "Novak", "Berg", "Sharma", "Dubois", "Castillo",
        "Nilsen", "Levi", "Koskinen", "Horvat", "Zhang", "Ortega", "Demir", "Kovac", "Janssen", "Rossi"]
CITIES = ["Lagos", "Uppsala", "Turin", "Kazan", "Izmir", "Beirut", "Split", "Sapporo", "Dhaka", "Kyoto",
          "Hilo", "Porto", "Cusco", "Brno", "Bergen", "Pune", "Lyon", "Quito", "Tromso", "Haifa"]
GENRES = ["mystery", "science fiction", "historical fiction", "poetry", "fantasy", "true crime",
          "romance", "horror", "biography", "satire"]
JOBS = ["baker", "pilot", "surgeon", "carpenter", "librarian", "chemist", "sailor", "painter",
        "farmer", "architect", "tailor", "teacher", "jeweller", "botanist"]
AWARDS = ["Silver Quill Prize", "Northern Lantern Award", "Harbor Light Medal", "Golden Fern Prize",
          "Copper Owl Award", "Azure Pen Prize", "Meridian Book Award", "Crimson Leaf Medal"]
NOUNS = ["River", "Lantern", "Orchard", "Compass", "Winter", "Mirror", "Harbor", "Garden", "Clock",
         "Mountain", "Letter", "Shadow", "Island", "Bridge"]
ADJS = ["Silent", "Hidden", "Last", "Burning", "Quiet", "Broken", "Golden", "Distant", "Secret", "Endless"]


def _author(rng: random.Random, name: str) -> dict:
    return {
        "name": name,
        "city": rng.choice(CITIES),
        "year": rng.randint(1920, 1995),
        "genre": rng.choice(GENRES),
        "father": rng.choice(JOBS),
        "mother": rng.choice(JOBS),
        "award": rng.choice(AWARDS),
        "book": f"The {rng.choice(ADJS)} {rng.choice(NOUNS)}",
    }


# (question, answer, paraphrased answer, attribute that perturbations change)
_TEMPLATES = [
    ("Where was {name} born?", "{name} was born in {city}.",
     "The birthplace of {name} is the city of {city}.", "city"),
    ("In which year was {name} born?", "{name} was born in {year}.",
     "The year {name} was born is {year}.", "year"),
    ("What genre does {name} write?", "{name} writes {genre}.",
     "The books of {name} belong to the {genre} genre.", "genre"),
    ("What did the father of {name} do for a living?", "The father of {name} was a {father}.",
     "{name} grew up with a father who worked as a {father}.", "father"),
    ("What was the profession of the mother of {name}?", "The mother of {name} was a {mother}.",
     "{name} had a mother who worked as a {mother}.", "mother"),
    ("Which award did {name} win?", "{name} won the {award}.",
     "The {award} was awarded to {name}.", "award"),
    ("What is the best known book by {name}?", "The best known book by {name} is {book}.",
     "{book} is the most famous work of {name}.", "book"),
    ("Who wrote {book}?", "{book} was written by {name}, a {genre} author from {city}.",
     "The {genre} author {name} from {city} wrote {book}.", "name"),
]

_POOLS = {"city": CITIES, "genre": GENRES, "father": JOBS, "mother": JOBS, "award": AWARDS}


def _perturb(rng: random.Random, author: dict, attr: str, others: list[dict]) -> dict:
    wrong = dict(author)
    if attr == "year":
        wrong["year"] = author["year"] + rng.choice([-1, 1]) * rng.randint(3, 30)
    elif attr == "book":
        while wrong["book"] == author["book"]:
            wrong["book"] = f"The {rng.choice(ADJS)} {rng.choice(NOUNS)}"
    elif attr == "name":
        wrong["name"] = rng.choice([o["name"] for o in others if o["name"] != author["name"]])
    else:
        wrong[attr] = rng.choice([v for v in _POOLS[attr] if v != author[attr]])
    return wrong


def _rows(rng: random.Random, authors: list[dict], n_perturbed: int) -> list[dict]:
    rows = []
    for a_idx, author in enumerate(authors):
        for q, ans, para, attr in _TEMPLATES:
            perturbed = []
            for _ in range(n_perturbed):
                wrong = _perturb(rng, author, attr, authors)
                perturbed.append(para.format(**wrong))
            rows.append({
                "question": q.format(**author),
                "answer": ans.format(**author),
                "paraphrased_answer": para.format(**author),
                "perturbed_answer": perturbed,
                "author": author["name"],
                "author_index": a_idx,
            })
    return rows


def generate_authors_qa(
    num_authors: int = 40, num_holdout_authors: int = 10, seed: int = 0, n_perturbed: int = 3
) -> dict[str, list[dict]]:
    """Return ``{"full": [...], "holdout": [...]}``: 8 QA rows per author."""
    rng = random.Random(seed)
    total = num_authors + num_holdout_authors
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    if total > len(names):
        raise ValueError(f"at most {len(names)} authors can be generated, asked for {total}")
    chosen = rng.sample(names, total)
    authors = [_author(rng, n) for n in chosen]
    return {
        "full": _rows(rng, authors[:num_authors], n_perturbed),
        "holdout": _rows(rng, authors[num_authors:], n_perturbed),
    }


QUESTIONS_PER_AUTHOR = len(_TEMPLATES)


def write_authors_qa(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    """Write ``full.jsonl`` and ``holdout.jsonl`` (TOFU-like layout); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate_authors_qa(**kwargs).items():
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        paths[split] = path
    return paths


def corpus_text(seed: int = 0) -> list[str]:
    """Plain texts to train the embedded tokenizer on."""
    splits = generate_authors_qa(num_authors=200, num_holdout_authors=30, seed=seed)
    out = []
    for rows in splits.values():
        for r in rows:
            out += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    return out
