"""Build a ShareGPT-format JSONL of prompts of the kinds ShareGPT has few of: extraction and
rewriting over a passage, math problems, science and humanities questions, reasoning puzzles,
classification of short messages, writing and role-play tasks, explanations of everyday topics. The
target answers them itself (`eaglespec train data --source FILE --regenerate`), so the head meets
its own text on prompts like those it drafts worst on MT-bench (extraction, stem, math, reasoning;
README, Limits).

Nothing here comes from a benchmark. Passages and short messages are turns of ShareGPT's training
split (never its held-out rows); math problems and puzzles are drawn from templates with random
numbers and names; questions and writing tasks pair lists of topics with forms. Every row's id
carries a digest of its prompt, so an answer store never hands an answer to another prompt, and
the same seed writes the same file. `--exclude` leaves out the prompts of earlier files, so a
second set adds only new rows.

Each row has a placeholder assistant turn (the data format needs one): train on the file only
with `--regenerate`, which replaces it with the target's answer.

    eaglespec train prompts --out runs/synth2/prompts.jsonl --seed 1 \
        --exclude runs/synth/prompts.jsonl
    eaglespec train data --out runs/synth2 --source runs/synth2/prompts.jsonl --regenerate \
        --gen-batch 48 --answer-store data/answers/smollm2-135m-instruct
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Iterator

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
    # imported here, not at the top: the command line reads KINDS for its help, and the data
    # module brings numpy
    from eaglespec.train.data import read_rows, split_of, to_messages

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
        (_, many), n, p, paid = r.choice(ITEMS), r.randint(2, 12), _money(r), r.choice([20, 50, 100])
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


# ---------------------------------------------------------------- reasoning puzzles
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["strawberry", "banana", "mississippi", "bookkeeper", "committee", "parallel", "necessary",
         "occurrence", "assessment", "balloon", "engineering", "independence", "millennium", "possession"]
COMPARISONS = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"),
               ("faster", "fastest", "slowest"), ("heavier", "heaviest", "lightest"), ("richer", "richest", "poorest")]
CHAINS = [("cats", "mammals", "animals"), ("roses", "flowers", "plants"), ("squares", "rectangles", "polygons"),
          ("violins", "string instruments", "musical instruments"), ("sparrows", "birds", "vertebrates"),
          ("novels", "books", "printed works"), ("oaks", "trees", "living things")]


def _reasoning_templates() -> list[Callable[[random.Random], str]]:
    def order(r):
        people, (more, most, least) = r.sample(NAMES, r.randint(3, 5)), r.choice(COMPARISONS)
        facts = [f"{a} is {more} than {b}." for a, b in zip(people, people[1:])]
        r.shuffle(facts)
        ask = r.choice([f"Who is the {most}?", f"Who is the {least}?", "Rank them from first to last."])
        return f"{' '.join(facts)} {ask} Explain your reasoning."

    def syllogism(r):
        a, b, c = r.choice(CHAINS)
        return r.choice([f"All {a} are {b}, and all {b} are {c}. Does it follow that all {a} are {c}? Does it follow that all {c} are {a}?",
                         f"Some {b} are not {a}. All {a} are {b}. Is the statement \"all {b} are {a}\" true, false, or uncertain? Explain.",
                         f"If no {c} could fly, could any {a} fly? Assume all {a} are {b} and all {b} are {c}."])

    def weekday(r):
        n, day = r.randint(10, 400), r.choice(DAYS)
        return r.choice([f"If today is {day}, what day of the week will it be in {n} days?",
                         f"If today is {day}, what day of the week was it {n} days ago?"])

    def letters(r):
        w = r.choice(WORDS)
        return f"How many times does the letter \"{r.choice(sorted(set(w)))}\" appear in the word \"{w}\"? Count carefully and show your count."

    def sequence(r):
        a, d = r.randint(1, 9), r.randint(2, 5)
        seq = r.choice([[a * d ** i for i in range(5)], [(a + i) ** 2 for i in range(5)],
                        [a + i * d + i * (i - 1) // 2 for i in range(5)]])
        return f"What is the next number in the sequence {', '.join(map(str, seq))}, ...? Explain the pattern."

    def family(r):
        a, b, c = r.sample(NAMES, 3)
        return r.choice([f"{a} is a parent of {b}. {c} is a sibling of {a}. How is {c} related to {b}?",
                         f"{a} is {b}'s parent, and {b} is {c}'s parent. What is {a} to {c}?",
                         f"{a} and {b} are siblings. {c} is {b}'s only child. How is {a} related to {c}?"])

    def directions(r):
        (x, y), k, name = r.choice([(3, 4), (6, 8), (5, 12), (8, 15)]), r.randint(1, 3), r.choice(NAMES)
        return f"{name} walks {x * k} km north, then turns right and walks {y * k} km. How far is {name} from the starting point, and in which direction?"

    def clock(r):
        return f"What is the angle between the hour hand and the minute hand of a clock at {r.randint(1, 12)}:{r.choice([0, 15, 20, 30, 40, 45]):02d}?"

    def race(r):
        n, k = r.randint(6, 20), r.randint(2, 5)
        return f"In a race of {n} runners, you overtake the runner in position {k}. What position are you in now, and how many runners are ahead of you?"

    def knights(r):
        a, b = r.sample(NAMES, 2)
        return r.choice([f"On an island, knights always tell the truth and knaves always lie. {a} says: \"{b} is a knave.\" {b} says: \"{a} and I are both knights.\" Who is a knight and who is a knave?",
                         f"Knights always tell the truth and knaves always lie. {a} says: \"At least one of us is a knave.\" What are {a} and {b}?"])

    def handshakes(r):
        n = r.randint(4, 30)
        return f"At a meeting of {n} people, everyone shakes hands with everyone else exactly once. How many handshakes are there? Explain."

    def socks(r):
        red, blue = r.randint(3, 15), r.randint(3, 15)
        return f"A drawer holds {red} red socks and {blue} blue socks. In the dark, how many socks must you take to be sure of a matching pair? How many to be sure of two red socks?"

    def decision(r):
        x, y = r.sample(["renting a flat", "buying a house", "taking the train", "driving", "learning Python",
                         "learning JavaScript", "working from home", "working in an office", "a fixed-rate loan",
                         "a variable-rate loan", "hiring a freelancer", "hiring a full-time employee"], 2)
        return f"Someone must choose between {x} and {y}. What questions should they ask themselves, and how should the answers change the choice? Reason step by step."

    return [order, syllogism, weekday, letters, sequence, family, directions, clock, race, knights,
            handshakes, socks, decision]


def reasoning_prompts(rng: random.Random, n: int) -> list[str]:
    templates = _reasoning_templates()
    return [rng.choice(templates)(rng) for _ in range(n)]


# ---------------------------------------------------------------- classification of short messages
CLASSIFY_TASKS = [
    "Classify the sentiment of each message below as positive, negative or neutral. Answer as a numbered list.",
    "For each message below, say what the writer wants (a question, a request for writing, a request for code, "
    "advice, or something else). Answer in a table.",
    "Label each of the following messages with one topic from: {categories}. Return a JSON object mapping each "
    "message number to its topic.",
    "Which of the following messages are about programming? List their numbers and explain briefly.",
    "Rate how formal each message below is on a scale of 1 to 5 and give a one-line reason for each.",
    "Group the following messages by topic and give each group a name.",
]
WORD_GROUPS = {"fruits": ["apple", "mango", "cherry", "pear", "plum", "kiwi"],
               "vegetables": ["carrot", "spinach", "onion", "leek", "potato", "celery"],
               "animals": ["otter", "falcon", "lizard", "wolf", "salmon", "beetle"],
               "tools": ["hammer", "wrench", "chisel", "saw", "pliers", "drill"],
               "countries": ["Peru", "Kenya", "Norway", "Vietnam", "Canada", "Egypt"],
               "instruments": ["cello", "flute", "drum", "harp", "trumpet", "guitar"]}


def user_messages(source: str | None, lo: int = 20, hi: int = 160) -> Iterator[str]:
    """Short, plain first user turns of ShareGPT's training split."""
    from eaglespec.train.data import read_rows, split_of, to_messages

    for row in read_rows(source):
        parsed = to_messages(row, drop_leading_assistant=True)
        if isinstance(parsed, str) or split_of(parsed[0]) != "train" or not parsed[1]:
            continue
        text = " ".join(parsed[1][0]["content"].split())
        if parsed[1][0]["role"] == "user" and lo <= len(text) <= hi and text.isascii() and "{" not in text:
            yield text


def classify_prompts(rng: random.Random, n: int, source: str | None) -> list[str]:
    pool = [m for _, m in zip(range(max(6 * n, 200)), user_messages(source))]
    if len(pool) < 6:
        raise ValueError(f"only {len(pool)} short user messages found for {n} classification prompts")
    out = []
    for _ in range(n):
        if rng.random() < 0.25:  # sorting words into groups
            groups = rng.sample(sorted(WORD_GROUPS), 3)
            words = [w for g in groups for w in rng.sample(WORD_GROUPS[g], 3)]
            rng.shuffle(words)
            out.append(f"Sort these words into {', '.join(groups[:-1])} and {groups[-1]}: {', '.join(words)}.")
            continue
        task = rng.choice(CLASSIFY_TASKS).format(categories=", ".join(rng.sample(CATEGORIES, 5)))
        items = "\n".join(f"{i}. {m}" for i, m in enumerate(rng.sample(pool, rng.randint(3, 6)), 1))
        out.append(f"{task}\n\n{items}")
    return out


# ---------------------------------------------------------------- writing and role-play
WRITING_FORMS = ["a persuasive email", "a blog post", "a product description", "a short story", "a poem",
                 "a short speech", "a cover letter", "a three-day travel itinerary", "a restaurant review",
                 "a social media post", "a limerick", "a dialogue between two friends", "a short news article",
                 "a polite complaint letter", "an apology note", "a motivational message", "a haiku sequence",
                 "an advertisement slogan with a short explanation", "a newsletter introduction", "a diary entry"]
WRITING_SUBJECTS = ["a new neighborhood bakery", "working from home", "a first trip abroad", "recycling at school",
                    "a lost cat that found its way home", "learning to play the piano", "a rainy Monday",
                    "an electric bicycle", "a community garden", "the first day at a new job", "a library that "
                    "never closes", "a mountain hike", "saving money on groceries", "a robot that learns to cook",
                    "a delayed flight", "a local football team's win", "moving to a new city", "a smartwatch",
                    "an old lighthouse", "a charity fun run", "a friendship that started online", "winter mornings",
                    "a science fair", "a small town's festival", "switching careers at forty"]
WRITING_CONSTRAINTS = ["", " Keep it under 150 words.", " Use exactly three paragraphs.", " Use a humorous tone.",
                       " Write it for a ten-year-old reader.", " Include at least two metaphors.",
                       " End with a question to the reader.", " Give it a catchy title.", " Write it in the second person."]
ROLES = ["a medieval blacksmith", "a tour guide in an old harbor town", "a pirate captain", "a patient chess coach",
         "a detective in 1920s London", "a friendly librarian", "an astronaut on a long mission", "a strict but fair "
         "chef", "a travel agent", "a personal fitness trainer", "a museum curator", "a startup founder pitching an idea"]
ROLE_ASKS = ["Introduce yourself and describe a typical day.", "Give me advice on getting started in your line of work.",
             "Tell me about the hardest problem you ever solved.", "What do most people misunderstand about your job?",
             "Convince me to try something you love."]


def writing_prompts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            out.append(f"Pretend you are {rng.choice(ROLES)} and stay in character. {rng.choice(ROLE_ASKS)}")
        else:
            out.append(f"Write {rng.choice(WRITING_FORMS)} about {rng.choice(WRITING_SUBJECTS)}.{rng.choice(WRITING_CONSTRAINTS)}")
    return out


# ---------------------------------------------------------------- explanations of everyday topics
EXPLAIN_TOPICS = [
    "how credit scores work", "index funds", "how mortgages work", "compound interest", "health insurance",
    "how vaccines are tested", "how a refrigerator works", "how noise-cancelling headphones work",
    "how touch screens work", "how a car engine works", "how airplanes stay in the air", "how bread rises",
    "why the sky is blue", "how tides work", "why leaves change color", "how rainbows form", "jet lag",
    "how memory works in the brain", "how muscles grow", "why we dream", "caffeine", "how antidepressants work",
    "how elections are counted", "how a bill becomes law", "how courts decide cases", "how patents work",
    "how search engines rank pages", "how Wi-Fi works", "how email is delivered", "public-key cryptography",
    "how video compression works", "how recommendation systems work", "how weather forecasts are made",
    "how dams generate electricity", "how recycling is sorted", "how desalination works", "composting",
    "how tennis scoring works", "how the offside rule works in football", "how marathons are paced",
    "how coffee is roasted", "fermentation in cooking", "how a sourdough starter works", "food preservation",
    "time zones", "leap years", "how maps distort the Earth", "how languages borrow words",
    "how the stock market works", "how supply chains work", "how airlines price tickets", "how insurance pools risk",
]
EXPLAIN_FORMS = [
    "Explain {t} step by step.", "Why does {t} matter in daily life?", "Write a short FAQ about {t}.",
    "Explain {t} using an analogy.", "What are the most common mistakes people make about {t}?",
    "Give a one-paragraph summary of {t}, then a longer explanation.", "Explain {t} in five bullet points.",
    "I am new to this: explain {t} and suggest what to learn next.",
]


# ---------------------------------------------------------------- file
KINDS = {  # kind -> default count. Kinds added later come last: the first set (seed 0, made at
    # commit 699346a) is rebuilt byte for byte with `--reasoning 0 --classify 0 --writing 0 --explain 0`
    "extraction": 600, "math": 500, "stem": 400, "humanities": 300,
    "reasoning": 500, "classify": 300, "writing": 400, "explain": 400,
}


def build(rng: random.Random, counts: dict[str, int], source: str | None = None) -> list[dict]:
    """ShareGPT rows {id, kind, conversations}; duplicate prompts are written once."""
    made = {
        "extraction": lambda n: extraction_prompts(rng, n, source),
        "math": lambda n: math_prompts(rng, n),
        "stem": lambda n: question_prompts(rng, n, STEM_TOPICS, STEM_FORMS),
        "humanities": lambda n: question_prompts(rng, n, HUMANITIES_TOPICS, HUMANITIES_FORMS),
        "reasoning": lambda n: reasoning_prompts(rng, n),
        "classify": lambda n: classify_prompts(rng, n, source),
        "writing": lambda n: writing_prompts(rng, n),
        "explain": lambda n: question_prompts(rng, n, EXPLAIN_TOPICS, EXPLAIN_FORMS),
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


def write_prompts(out: Path, counts: dict[str, int], seed: int = 0, source: str | None = None,
                  exclude: list[Path] = ()) -> tuple[list[dict], int]:
    """Build the rows for `seed`, leave out those whose id is in an `exclude` file, shuffle them
    (kinds mixed, so a run stopped early has some of each) and write them to `out` as JSONL.
    Returns the rows written and how many were left out."""
    rows = build(random.Random(seed), counts, source)
    old = {json.loads(line)["id"] for f in exclude for line in Path(f).read_text().splitlines() if line.strip()}
    kept = [r for r in rows if r["id"] not in old]
    random.Random(seed + 1).shuffle(kept)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept, len(rows) - len(kept)
