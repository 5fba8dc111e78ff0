"""Generate the embedded demo data sets (deterministic): ``python -m fabric_align.assets.make_demo_data``.

KTO demo: short requests answered either helpfully and politely (desirable) or curtly and unhelpfully
(undesirable), in TRL's conversational and plain forms. SFT demo (SPIN): the helpful answers as conversations.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

TOPICS = [
    ("the weather", "it looks sunny with a light breeze"),
    ("a good book", "try a short mystery novel"),
    ("dinner ideas", "a warm vegetable soup is easy"),
    ("learning math", "practice a few problems each day"),
    ("sleeping better", "keep a regular bedtime"),
    ("a gift for a friend", "a handwritten card is lovely"),
    ("staying focused", "work in short blocks with breaks"),
    ("a weekend trip", "a nearby lake is relaxing"),
    ("cooking rice", "rinse it and use two cups of water"),
    ("saving money", "set aside a little every week"),
    ("a morning routine", "start with a glass of water"),
    ("learning to draw", "sketch simple shapes first"),
    ("growing herbs", "basil likes sun and regular water"),
    ("writing an email", "keep it short and clear"),
    ("a rainy day", "a puzzle or a film is cozy"),
    ("fixing a bike", "check the tire pressure first"),
]
ASKS = [
    "Can you help me with {t}?",
    "Any advice on {t}?",
    "What do you suggest for {t}?",
    "Tell me about {t}.",
    "I need tips on {t}.",
    "Help with {t}, please.",
]
GOOD = [
    "Happy to help! {a}. I hope that helps.",
    "Sure thing: {a}. Good luck!",
    "Of course. {a}. Enjoy!",
    "Great question! {a}. Let me know if you need more.",
]
BAD = [
    "No. Figure it out yourself.",
    "Not my problem.",
    "Whatever. Ask someone else.",
    "I do not care about that.",
    "Stop asking me things.",
    "That is boring. Go away.",
]


def kto_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        topic, answer = rng.choice(TOPICS)
        prompt = rng.choice(ASKS).format(t=topic)
        desirable = rng.random() < 0.5
        completion = rng.choice(GOOD).format(a=answer.capitalize()) if desirable else rng.choice(BAD)
        if i % 3 == 0:  # plain-text form
            rows.append({"prompt": prompt + "\n", "completion": completion, "label": desirable})
        else:  # conversational form
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                    "label": desirable,
                }
            )
    return rows


def sft_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        topic, answer = rng.choice(TOPICS)
        messages = [
            {"role": "user", "content": rng.choice(ASKS).format(t=topic)},
            {"role": "assistant", "content": rng.choice(GOOD).format(a=answer.capitalize())},
        ]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    write_jsonl(HERE / "kto_demo_train.jsonl", kto_rows(random.Random(0), 256))
    write_jsonl(HERE / "kto_demo_val.jsonl", kto_rows(random.Random(1), 48))
    write_jsonl(HERE / "sft_demo_train.jsonl", sft_rows(random.Random(2), 64))
    write_jsonl(HERE / "sft_demo_val.jsonl", sft_rows(random.Random(3), 16))


if __name__ == "__main__":
    main()
