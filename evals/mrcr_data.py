"""MRCR data in the openai/mrcr format, and its official grading rule.

A record: `prompt` (a JSON list of chat messages), `answer` (`random_string_to_prepend` + the target assistant
message), `random_string_to_prepend` (10 characters), `n_needles` (how often the needle request appears),
`desired_msg_index` (index in the messages of the target assistant reply), `total_messages`, `n_chars` (characters
of all message contents).

The public dataset is not reachable everywhere, so `generate_record` builds conversations in exactly that format,
deterministically from a seed: a first user message with worked examples, then alternating user requests
"write a {format} about {topic}" ("an" before a vowel) and assistant replies, the needle request repeated
`n_needles` times with identical wording among distractors (some share its format or its topic), and the final
"Prepend {hash} to the {k}th (1 indexed) {format} about {topic}. ..." request. Replies are text from a
word-bigram chain over the Zen of Python (the stdlib `this` module, unchanged since Python 2.2, so records are the
same on every machine and Python version), with the topic woven in; what is measured is finding and copying the
k-th of N identical requests' replies."""
from __future__ import annotations

import codecs
import contextlib
import difflib
import io
import json
import os
import random
import string
from functools import lru_cache
from typing import Any

FORMATS = ["poem", "story", "riddle", "essay", "letter", "speech", "song", "limerick", "fable", "sonnet",
           "blog post", "diary entry", "news report", "lullaby", "toast", "haiku sequence"]
TOPICS = ["tapirs", "lighthouses", "glaciers", "coffee", "night trains", "owls", "bridges", "volcanoes", "libraries",
          "bees", "comets", "harbors", "lanterns", "deserts", "clockmakers", "kites", "orchards", "submarines",
          "snowfall", "marathons", "violins", "foxes", "islands", "bakeries", "thunderstorms", "maps", "robots",
          "gardens", "rivers", "chess"]
FIELDS = ("prompt", "answer", "random_string_to_prepend", "n_needles", "desired_msg_index", "total_messages",
          "n_chars")
HASH_ALPHABET = string.ascii_letters + string.digits


def grade(response: str, answer: str, random_string_to_prepend: str) -> float:
    """The official MRCR grader: 0 unless the response starts with the hash, else the SequenceMatcher ratio of
    response and answer with the hash removed from both."""
    if not response.startswith(random_string_to_prepend):
        return 0.0
    response = response.removeprefix(random_string_to_prepend)
    answer = answer.removeprefix(random_string_to_prepend)
    return float(difflib.SequenceMatcher(None, response, answer).ratio())


@lru_cache(maxsize=1)
def _chain() -> tuple[dict[str, list[str]], list[str]]:
    """Word-bigram successors over the Zen of Python, and the words that start a sentence."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    text = codecs.decode(this.s, "rot13")
    lines = [ln.strip() for ln in text.splitlines()[2:] if ln.strip()]  # drop the title line
    successors: dict[str, list[str]] = {}
    starts: list[str] = []
    for line in lines:
        words = line.replace("--", " ").split()
        starts.append(words[0])
        for a, b in zip(words, words[1:] + ["\n"]):
            successors.setdefault(a, []).append(b)
    return successors, starts


def _sentence(rng: random.Random, topic: str, max_words: int = 14) -> str:
    successors, starts = _chain()
    word = rng.choice(starts)
    words = [word]
    while len(words) < max_words:
        word = rng.choice(successors.get(word, ["\n"]))
        if word == "\n":
            break
        words.append(word)
    if rng.random() < 0.6:  # weave the topic in
        words.insert(rng.randrange(1, len(words) + 1), f"like {topic}" if rng.random() < 0.5 else topic)
    text = " ".join(words).rstrip(".,!*-")
    return text[0].upper() + text[1:] + rng.choice([".", ".", "!", ";", "."])


def make_reply(rng: random.Random, fmt: str, topic: str) -> str:
    """An assistant reply to "write a {fmt} about {topic}": a title and 2-4 stanzas of 2-5 sentences."""
    title = f"{fmt.title()}: {rng.choice(['On', 'Of', 'For', 'About', 'Among'])} {topic.title()}"
    stanzas = ["\n".join(_sentence(rng, topic) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(2, 4))]
    return title + "\n\n" + "\n\n".join(stanzas)


def write_request(fmt: str, topic: str) -> str:
    return f"write {'an' if fmt[0] in 'aeiou' else 'a'} {fmt} about {topic}"


def ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def final_request(hash_: str, k: int, fmt: str, topic: str) -> str:
    return (f"Prepend {hash_} to the {ordinal(k)} (1 indexed) {fmt} about {topic}. Do not include any other text "
            f"in your response.")


def _examples(rng: random.Random) -> str:
    """The first user message: two worked examples of the task (with placeholder replies)."""
    parts = ["Here are some examples of conversations followed by a final question that was answered correctly:"]
    for _ in range(2):
        fmt, topic = rng.choice(FORMATS), rng.choice(TOPICS)
        n = rng.randint(2, 3)
        k = rng.randint(1, n)
        hash_ = "".join(rng.choice(HASH_ALPHABET) for _ in range(10))
        lines = ["======EXAMPLE======"]
        for i in range(1, n + 1):
            lines += [f"User: {write_request(fmt, topic)}", f"Assistant: ({ordinal(i)} {fmt} about {topic})"]
        lines += [f"User: {final_request(hash_, k, fmt, topic)}", f"Assistant: {hash_}({ordinal(k)} {fmt} about "
                  f"{topic})", "======END EXAMPLE======"]
        parts.append("\n".join(lines))
    parts.append("Now the real conversation begins. At its end you will be asked to prepend a string to one of the "
                 "assistant's earlier replies; answer with exactly that string followed by that reply.")
    return "\n\n".join(parts)


def generate_record(seed: int, n_needles: int, target_chars: int) -> dict[str, Any]:
    """One conversation of about `target_chars` characters with `n_needles` identical needle requests."""
    if n_needles < 1:
        raise ValueError(f"n_needles={n_needles} is invalid: it must be at least 1")
    rng = random.Random(f"mrcr-{seed}-{n_needles}-{target_chars}")
    fmt, topic = rng.choice(FORMATS), rng.choice(TOPICS)
    needle_request = write_request(fmt, topic)
    first = _examples(rng)
    needles = [make_reply(rng, fmt, topic) for _ in range(n_needles)]
    size = len(first) + sum(len(needle_request) + len(r) for r in needles)
    distractors: list[tuple[str, str]] = []
    while size < target_chars or len(distractors) < n_needles:
        d_fmt, d_topic = rng.choice(FORMATS), rng.choice(TOPICS)
        if rng.random() < 0.3:  # hard distractors: the needle's format or its topic, never both
            d_fmt, d_topic = (fmt, d_topic) if rng.random() < 0.5 else (d_fmt, topic)
        if (d_fmt, d_topic) == (fmt, topic):
            continue
        request, reply = write_request(d_fmt, d_topic), make_reply(rng, d_fmt, d_topic)
        distractors.append((request, reply))
        size += len(request) + len(reply)
    slots = sorted(rng.sample(range(len(distractors) + n_needles), n_needles))
    pairs, d_iter, n_iter = [], iter(distractors), iter(needles)
    for i in range(len(distractors) + n_needles):
        pairs.append((needle_request, next(n_iter)) if i in slots else next(d_iter))
    k = rng.randint(1, n_needles)
    hash_ = "".join(rng.choice(HASH_ALPHABET) for _ in range(10))
    messages = [{"role": "user", "content": first}]
    for request, reply in pairs:
        messages += [{"role": "user", "content": request}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": final_request(hash_, k, fmt, topic)})
    desired = 1 + 2 * slots[k - 1] + 1  # after the first message: (user, assistant) per pair
    return {"prompt": json.dumps(messages, ensure_ascii=False), "answer": hash_ + messages[desired]["content"],
            "random_string_to_prepend": hash_, "n_needles": n_needles, "desired_msg_index": desired,
            "total_messages": len(messages), "n_chars": sum(len(m["content"]) for m in messages), "seed": seed}


def load_dataset(path: str) -> list[dict[str, Any]]:
    """Records of the public openai/mrcr data: a .parquet file (needs pandas + pyarrow), a .jsonl file, or a folder
    of them (read in name order)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".parquet", ".jsonl")))
        return [r for f in files for r in load_dataset(f)]
    if path.endswith(".parquet"):
        import pandas as pd
        records = pd.read_parquet(path).to_dict(orient="records")
    else:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    missing = [k for k in FIELDS if records and k not in records[0]]
    if missing:
        raise ValueError(f"{path}: not in the openai/mrcr format (missing {', '.join(missing)})")
    return [{k: (int(v) if k in ("n_needles", "desired_msg_index", "total_messages", "n_chars") else v)
             for k, v in r.items() if k in FIELDS} for r in records]
