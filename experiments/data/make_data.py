"""Generate the small datasets of experiments/data/, deterministically (seeded), from templates written
for this project (no third-party text, so they are under the project's license).

Two worlds:

1. The toy world of `rlhf_ray.models.tiny`: every word is in its VOCABULARY, and the built-in reward
   (`envs.builtin.sentiment_score`) counts positive minus negative words.
   - prompts.jsonl / prompts_heldout.jsonl   {"prompt"}: sentence openings, two disjoint sets
   - sft.jsonl                               {"prompt", "response"}: continuations with positive words
   - preferences.jsonl                       {"prompt", "chosen", "rejected"}: the planted preference,
     sentiment_score(chosen) > sentiment_score(rejected), both of the same length in words (so length
     tells nothing), from pairs positive/negative, positive/neutral and mixed/mixed.
   - ratings.jsonl                           {"prompt", "response", "rating" 1..5 or "like" true/false}: the
     satisfaction model's data, ratings that follow the sentiment score with some noise
2. An assistant world for SmolLM2-135M-Instruct: user questions with a polite, concise answer (chosen)
   and a rude or rambling one with the same facts (rejected).
   - assistant_prompts.jsonl / assistant_prompts_heldout.jsonl   {"prompt"}: held-out topics are unseen
   - assistant_sft.jsonl                     {"prompt", "response"}: the polite, concise answers
   - assistant_preferences.jsonl             {"prompt", "chosen", "rejected"}: ~200 pairs
3. The verifiable tasks of `envs.tasks`, from each task's own prompt generator:
   - tasks/<task>_train.jsonl / tasks/<task>_heldout.jsonl   {"prompt"}: the held-out prompts are drawn
     first and none of them is in the train file, so the held-out score (`train.eval_every`,
     `rlhf-ray eval`) is measured on prompts the policy never trained on

    python experiments/data/make_data.py            # rewrite the files beside this script
    python experiments/data/make_data.py --check    # exit 1 if they differ from what it would write
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

from rlhf_ray.models.tiny import NEGATIVE_WORDS, POSITIVE_WORDS, VOCABULARY

SEED = 20240601
HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------- the toy world

SUBJECTS = ["the movie", "the food", "the day", "the book", "the music", "the weather", "the team",
            "the city", "my day", "our team", "this movie", "this book", "my book", "our city",
            "the movie with all the music", "this city"]
OPENERS = ["", "i think ", "today ", "i really think ", "and "]
VERBS = ["was", "is"]
MODIFIERS = ["", "very", "so", "quite", "really", "all"]
EXTRA_PROMPTS = ["i felt", "today i felt", "it was a", "it is quite", "i think it was", "my day felt"]
ADVERBS = ["", "very", "so", "quite", "really"]
NEUTRAL_FILLERS = ["today", "music", "food", "weather", "all", "quite"]  # one word each: equal lengths


def toy_prompts() -> list[str]:
    prompts = {f"{opener}{subject} {verb}" + (f" {modifier}" if modifier else "")
               for opener, subject, verb, modifier in itertools.product(OPENERS, SUBJECTS, VERBS, MODIFIERS)}
    return sorted(prompts | set(EXTRA_PROMPTS))


def _phrase(rng: random.Random, words: list[str]) -> str:
    """A short continuation built on `words`, e.g. 'so great and fun .' or 'good . i think it was best .'"""
    adverb = rng.choice(ADVERBS)
    lead = f"{adverb} {words[0]}" if adverb else words[0]
    if len(words) == 1:
        return f"{lead} ."
    if len(words) == 2:
        joiner = rng.choice(["and", "but", "and so"])
        return f"{lead} {joiner} {words[1]} ."
    return f"{lead} and {words[1]} . i think it was {words[2]} ."


def positive_response(rng: random.Random) -> str:
    return _phrase(rng, rng.sample(POSITIVE_WORDS, rng.choice([1, 2, 3])))


def _response_pair(rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) on one skeleton, the chosen with more positive and fewer negative words."""
    kind = rng.choice(["positive/negative", "positive/neutral", "mixed/mixed"])
    n = rng.choice([2, 3])
    positives, negatives = rng.sample(POSITIVE_WORDS, n), rng.sample(NEGATIVE_WORDS, n)
    if kind == "positive/negative":
        chosen_words, rejected_words = positives, negatives
    elif kind == "positive/neutral":
        chosen_words, rejected_words = positives, rng.sample(NEUTRAL_FILLERS, n)
    else:  # 1 positive, 1 negative vs 2 negatives; or 2 positives, 1 negative vs 1 positive, 2 negatives
        chosen_words = positives[: n - 1] + negatives[:1]
        rejected_words = positives[n - 1:] + negatives[1:] if n == 3 else negatives
        rng.shuffle(chosen_words)
        rng.shuffle(rejected_words)
    adverb_state = rng.getstate()  # the same adverbs and joiners for both: one skeleton
    chosen = _phrase(rng, chosen_words)
    rng.setstate(adverb_state)
    rejected = _phrase(rng, rejected_words)
    return chosen, rejected


def toy_datasets(rng: random.Random) -> dict[str, list[dict]]:
    from envs.builtin import sentiment_score

    prompts = toy_prompts()
    rng.shuffle(prompts)
    heldout, train = prompts[:80], prompts[80:480]
    sft = [{"prompt": prompt, "response": positive_response(rng)} for prompt in rng.sample(train, 300)]
    preferences = []
    for prompt in rng.sample(train, 300):
        chosen, rejected = _response_pair(rng)
        assert sentiment_score(chosen) > sentiment_score(rejected), (chosen, rejected)
        assert len(chosen.split()) == len(rejected.split()), (chosen, rejected)
        preferences.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    datasets = {
        "prompts.jsonl": [{"prompt": p} for p in train],
        "prompts_heldout.jsonl": [{"prompt": p} for p in heldout],
        "sft.jsonl": sft,
        "preferences.jsonl": preferences,
    }
    vocabulary = set(VOCABULARY)
    for name, records in datasets.items():
        for record in records:
            for text in record.values():
                unknown = set(text.split()) - vocabulary
                assert not unknown, f"{name}: words {unknown} not in the tiny vocabulary: {text!r}"
    return datasets


def toy_ratings(prompts: list[str], rng: random.Random, count: int = 300) -> list[dict]:
    """Toy answers to training prompts as people might rate them: a rating 1..5 that follows the sentiment
    score s (1 + 4 (s + 1) / 2, rounded), off by one for a fifth of them (people differ); every fourth record
    a like (s > 0) or dislike instead. The answers are one side of a preference-style pair or a positive one."""
    from envs.builtin import sentiment_score

    records = []
    for number in range(count):
        response = positive_response(rng) if rng.random() < 0.25 else rng.choice(_response_pair(rng))
        score = sentiment_score(response)
        record = {"prompt": rng.choice(prompts), "response": response}
        if number % 4 == 3:
            record["like"] = score > 0
        else:
            rating = 1 + round(4 * (score + 1) / 2)
            if rng.random() < 0.2:
                rating += rng.choice([-1, 1])
            record["rating"] = min(5, max(1, rating))
        records.append(record)
    return records


# ---------------------------------------------------------------- the assistant world

# (topic, question forms, concise answer): plain facts and everyday advice, written for this project.
TOPICS = [
    ("boil an egg", ["How do I boil an egg?", "What's the best way to boil an egg?"],
     "Put the egg in boiling water for about 7 minutes for a firm yolk, then cool it in cold water."),
    ("capital of France", ["What is the capital of France?", "Which city is the capital of France?"],
     "The capital of France is Paris."),
    ("water boiling point", ["At what temperature does water boil?", "What is the boiling point of water?"],
     "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit)."),
    ("sleep better", ["How can I sleep better?", "Any tips for better sleep?"],
     "Keep a regular bedtime, avoid screens and caffeine late in the day, and keep your room dark and cool."),
    ("learn Python", ["How should I start learning Python?", "What's a good way to learn Python?"],
     "Install Python, follow a beginner tutorial, and write a small program of your own every day."),
    ("days in a leap year", ["How many days are in a leap year?", "How long is a leap year?"],
     "A leap year has 366 days."),
    ("photosynthesis", ["What is photosynthesis?", "Can you explain photosynthesis?"],
     "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("save money", ["How can I save money each month?", "Any tips for saving money?"],
     "Track your spending, set a budget, and move a fixed amount to savings as soon as you are paid."),
    ("reverse a list in Python", ["How do I reverse a list in Python?", "What's the way to reverse a Python list?"],
     "Use my_list.reverse() to reverse it in place, or my_list[::-1] to get a reversed copy."),
    ("largest planet", ["What is the largest planet in the solar system?", "Which planet is the biggest?"],
     "Jupiter is the largest planet in the solar system."),
    ("write a thank-you note", ["How do I write a thank-you note?", "What should a thank-you note say?"],
     "Thank the person for the specific thing, say how it helped you, and close warmly. A few lines is enough."),
    ("stay focused", ["How can I stay focused while studying?", "Any tips to focus when I study?"],
     "Put your phone away, work in 25-minute blocks with short breaks, and set one clear goal per session."),
    ("speed of light", ["How fast does light travel?", "What is the speed of light?"],
     "Light travels at about 300,000 kilometres per second in a vacuum."),
    ("make tea", ["How do I make a good cup of tea?", "What's the right way to make tea?"],
     "Pour freshly boiled water over the tea, steep it for 3 to 5 minutes, then remove the leaves or bag."),
    ("convert Celsius to Fahrenheit", ["How do I convert Celsius to Fahrenheit?",
                                       "What's the formula from Celsius to Fahrenheit?"],
     "Multiply the Celsius temperature by 9/5 and add 32."),
    ("prepare for an interview", ["How should I prepare for a job interview?", "Any tips for a job interview?"],
     "Research the company, practise answers to common questions, and prepare a few questions of your own."),
    ("what is a noun", ["What is a noun?", "Can you tell me what a noun is?"],
     "A noun is a word that names a person, place, thing or idea, like 'teacher', 'city' or 'joy'."),
    ("drink enough water", ["How much water should I drink a day?", "How much water do I need daily?"],
     "Many adults need around 2 litres a day, more in hot weather or when exercising."),
    ("git commit", ["How do I save my changes with git?", "How do I commit changes in git?"],
     "Stage the files with git add, then run git commit -m 'a short message'."),
    ("continents", ["How many continents are there?", "What are the continents?"],
     "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("clean a laptop screen", ["How do I clean my laptop screen?", "What's safe for cleaning a laptop screen?"],
     "Turn it off and wipe it gently with a soft microfibre cloth, slightly damp with water if needed."),
    ("start running", ["How do I start running?", "Any advice for a beginner runner?"],
     "Start with short runs mixed with walking three times a week, and add a few minutes each week."),
    ("moon phases", ["Why does the moon have phases?", "What causes the phases of the moon?"],
     "As the moon orbits Earth, we see different parts of its sunlit half, which makes the phases."),
    ("apologize", ["How do I apologize to a friend?", "What's a good way to say sorry to a friend?"],
     "Say clearly what you did wrong, acknowledge how it affected them, and tell them what you will do differently."),
    ("triangle angles", ["What do the angles of a triangle add up to?", "What is the sum of a triangle's angles?"],
     "The angles of a triangle add up to 180 degrees."),
    ("remember names", ["How can I remember people's names?", "Any tricks for remembering names?"],
     "Repeat the name when you hear it, use it once in conversation, and link it to something about the person."),
    ("what is DNA", ["What is DNA?", "Can you explain what DNA is?"],
     "DNA is the molecule that carries the genetic instructions living things use to grow and function."),
    ("keep plants alive", ["How do I keep my houseplants alive?", "Any tips for houseplant care?"],
     "Give them the light they need, water only when the top of the soil is dry, and use pots that drain."),
    ("sort a list in Python", ["How do I sort a list in Python?", "What's the way to sort a Python list?"],
     "Use sorted(my_list) for a new sorted list, or my_list.sort() to sort it in place."),
    ("tallest mountain", ["What is the tallest mountain in the world?", "Which mountain is the highest?"],
     "Mount Everest is the tallest mountain above sea level, at about 8,849 metres."),
    ("write an email subject", ["How do I write a good email subject line?", "What makes a good email subject?"],
     "Keep it short and specific, and say what you need, like 'Question about Friday's meeting'."),
    ("calm down", ["How can I calm down when I'm stressed?", "What helps when I feel stressed?"],
     "Take a few slow, deep breaths, step away for a short walk, and focus on one small next step."),
    ("why is the sky blue", ["Why is the sky blue?", "What makes the sky look blue?"],
     "Air scatters blue sunlight more than red, so blue light reaches your eyes from every part of the sky."),
    ("cook rice", ["How do I cook rice?", "What's a simple way to cook rice?"],
     "Rinse the rice, simmer one cup with two cups of water, covered, for about 18 minutes, then let it rest."),
    ("what is an API", ["What is an API?", "Can you explain what an API is?"],
     "An API is a defined way for one program to ask another for data or actions."),
    ("hours in a week", ["How many hours are in a week?", "How long is a week in hours?"],
     "A week has 168 hours."),
    ("learn a language", ["How can I learn a new language?", "What's a good way to learn a language?"],
     "Practise a little every day, learn common words first, and talk with native speakers as soon as you can."),
    ("fix a slow computer", ["Why is my computer slow?", "How can I speed up my computer?"],
     "Close programs you are not using, restart it, and check that the disk is not almost full."),
    ("what is gravity", ["What is gravity?", "Can you explain gravity?"],
     "Gravity is the force by which masses attract each other; it keeps us on Earth and Earth around the Sun."),
    ("give feedback", ["How do I give feedback to a colleague?", "What's a good way to give feedback?"],
     "Be specific about what happened, explain its effect, and suggest what could work better next time."),
    ("primary colors", ["What are the primary colors?", "Which colors are primary?"],
     "In painting the primary colors are red, yellow and blue; for light they are red, green and blue."),
    ("plan a trip", ["How do I plan a trip?", "Any tips for planning a trip?"],
     "Set a budget and dates, book travel and a place to stay, and list a few things you want to do."),
    ("what is inflation", ["What is inflation?", "Can you explain inflation?"],
     "Inflation is the general rise in prices over time, which means money buys less than before."),
    ("back up files", ["How should I back up my files?", "What's a good way to back up files?"],
     "Keep copies in two places, such as an external drive and a cloud service, and back up regularly."),
    ("chess pieces", ["How many pieces does each chess player start with?",
                      "How many chess pieces does one side have?"],
     "Each player starts with 16 pieces: 8 pawns, 2 rooks, 2 knights, 2 bishops, a queen and a king."),
    ("be on time", ["How can I stop being late?", "Any tips for being on time?"],
     "Plan to arrive 10 minutes early, prepare things the night before, and set a reminder to leave."),
    ("what is a prime number", ["What is a prime number?", "Can you explain prime numbers?"],
     "A prime number is a whole number above 1 that divides only by 1 and itself, like 2, 3, 5 and 7."),
    ("wash a wool sweater", ["How do I wash a wool sweater?", "What's the right way to wash wool?"],
     "Hand wash it in cool water with a wool detergent, press out the water gently, and dry it flat."),
]
QUESTION_LEADS = ["", "Hi! ", "Quick question: ", "Hello! ", "Could you help me? "]

POLITE_OPENERS = ["Sure! ", "Happy to help. ", "Good question! ", "Of course. ", "Great question. ", ""]
POLITE_CLOSERS = ["", " Hope that helps!", " Let me know if you have more questions.", " Good luck!"]
RUDE_OPENERS = ["Ugh, fine. ", "Seriously? Everyone knows this. ", "Whatever. ", "Look it up yourself next time. ",
                "Wow, really? ", "I can't believe you're asking this. "]
RUDE_CLOSERS = ["", " Don't ask me again.", " Try to keep up.", " Obviously."]
RAMBLE_OPENERS = [
    "Well, that is a really interesting thing to think about, and there are so many ways to look at it, and "
    "people have had many different opinions over the years, so let me just start from the very beginning. ",
    "Okay, so, before I answer, I want to say that this reminds me of something I was thinking about the other "
    "day, which is not exactly related, but it is kind of related if you think about it long enough. ",
    "Hmm, let me think about this for a moment, because it is one of those questions that seems simple but "
    "actually has a lot of layers, and I want to make sure I cover absolutely everything. ",
]
RAMBLE_MIDDLES = [
    " Anyway, as I was saying, there is a lot more one could add here, and some people would say it depends, "
    "and others would disagree, and honestly it is hard to say for sure.",
    " Of course, that's just one way to put it, and I could go on about the history of it, and the details, "
    "and all the exceptions, and the exceptions to the exceptions, for quite a while.",
    " But then again, everyone is different, and what works for one person might not work for another, so "
    "you should really think about it a lot and maybe ask around and read a lot more about it too.",
]


def _rejected(rng: random.Random, answer: str) -> tuple[str, str]:
    """(kind, text): rude, rambling, or both, with the same facts as the concise answer."""
    kind = rng.choice(["rude", "rambling", "rude and rambling"])
    if kind == "rude":
        return kind, rng.choice(RUDE_OPENERS) + answer + rng.choice(RUDE_CLOSERS)
    rambling = rng.choice(RAMBLE_OPENERS) + "So, here it is: " + answer + rng.choice(RAMBLE_MIDDLES)
    if kind == "rambling":
        return kind, rambling
    return kind, rng.choice(RUDE_OPENERS) + rambling + rng.choice(RUDE_CLOSERS)


def assistant_datasets(rng: random.Random) -> dict[str, list[dict]]:
    topics = list(TOPICS)
    rng.shuffle(topics)
    heldout_topics, train_topics = topics[:8], topics[8:]

    def questions(topic_list):
        return [(lead + question, answer)
                for _, forms, answer in topic_list for question in forms for lead in QUESTION_LEADS]

    train, heldout = questions(train_topics), questions(heldout_topics)
    preferences = []
    for prompt, answer in rng.sample(train, 200):
        _, rejected = _rejected(rng, answer)
        chosen = rng.choice(POLITE_OPENERS) + answer + rng.choice(POLITE_CLOSERS)
        preferences.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    sft = [{"prompt": prompt, "response": rng.choice(POLITE_OPENERS) + answer} for prompt, answer in
           rng.sample(train, 200)]
    return {
        "assistant_prompts.jsonl": [{"prompt": prompt} for prompt, _ in train],
        "assistant_prompts_heldout.jsonl": [{"prompt": prompt} for prompt, _ in heldout],
        "assistant_sft.jsonl": sft,
        "assistant_preferences.jsonl": preferences,
    }


# ---------------------------------------------------------------- files

TASK_SEED = 20260101
TASK_TRAIN, TASK_HELDOUT = 200, 48


def task_datasets(seed: int = TASK_SEED) -> dict[str, list[dict]]:
    """{tasks/<file>: records} of every task of `envs.tasks`; each task's prompts from its own seed, so adding
    a task changes no other task's files."""
    from envs.tasks import TASKS

    datasets = {}
    for offset, task in enumerate(TASKS.values()):
        prompts = task.prompts(TASK_HELDOUT + TASK_TRAIN, seed + offset)
        datasets[f"tasks/{task.name}_heldout.jsonl"] = [{"prompt": p} for p in prompts[:TASK_HELDOUT]]
        datasets[f"tasks/{task.name}_train.jsonl"] = [{"prompt": p} for p in prompts[TASK_HELDOUT:]]
    return datasets


def dialogue_datasets() -> dict[str, list[dict]]:
    """{dialogue/<file>: records}: the opening messages of `envs.dialogue`'s tasks, train and held out."""
    from envs.dialogue import calculator_prompts, refund_prompts

    datasets = {}
    for split in ("train", "heldout"):
        datasets[f"dialogue/refund_{split}.jsonl"] = [{"prompt": p} for p in refund_prompts(split)]
        datasets[f"dialogue/calculator_{split}.jsonl"] = [
            {"prompt": p} for p in calculator_prompts(split, count=200 if split == "train" else 48)]
    return datasets


def all_datasets(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    toy = toy_datasets(rng)
    # a stream of its own, so that the files made before it stay the same
    ratings = toy_ratings([r["prompt"] for r in toy["prompts.jsonl"]], random.Random(seed + 1))
    return {**toy, "ratings.jsonl": ratings, **assistant_datasets(rng), **task_datasets(), **dialogue_datasets()}


def as_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: beside this script)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    stale = []
    for name, records in all_datasets(args.seed).items():
        path, text = args.out / name, as_jsonl(records)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {len(records)} records")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python {Path(__file__).name})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
