"""SPIN's generation phase: ``fabric_align.generation.generate`` against Hugging Face ``model.generate``.

Both decode the same prompts with the same model (random weights from a config), batch size and ``max_new_tokens``,
with left padding and a KV cache (Hugging Face: ``DynamicCache``; fabric-align: its own, preallocated), in two modes:
sampling at temperature 1 and top-p 1 (SPIN's defaults; Hugging Face's default ``top_k=50`` is switched off so both
sample from the full distribution) and greedy. Prompts are taken shortest first by both: Hugging Face's in fixed
batches of that order, fabric-align's joining its running batch as rows end.

Generated tokens/s = generated tokens (up to and including EOS; with random weights EOS almost never comes, so
nearly every answer is ``max_new_tokens`` long) / wall time of the whole call. Methods alternate within each
round; the table shows the median over rounds. Greedy outputs are compared token by token as a sanity check.

Wall time of the whole call includes the prefill (prompts of 32-128 tokens) as well as the decode steps. Small
decode steps are sensitive to other jobs on a shared CPU (threads waiting for each other); ``--threads 1`` gives
steadier numbers there.

``--model smollm2``: the realistic mode. A random-weight model never emits its end token, so every answer is
``max_new_tokens`` long: no row ever finishes early, and what a framework spends on rows that have finished never
shows. Here the model is the real SmolLM2-135M-Instruct (``fabric_align.models.fetch("smollm2-135m-instruct")``, from
the local cache), the prompts are chat-template renderings of a fixed list of 32 user requests of very different
lengths (one-line questions, requests of a few sentences, and texts of 70-170 words to summarize, continue or review,
written in this script: 33 to 227 tokens with the template's system line, median 55), and generation stops at the
model's real end tokens (``fabric_align.modeling.end_token_ids``: ``<|im_end|>`` and ``<|endoftext|>``), passed to
Hugging Face's ``generate`` as its ``eos_token_id`` list. Answers then end at different times. fabric-align's
``generate`` batches continuously: once a quarter of the batch has ended, those rows leave it (and its KV cache) and
waiting prompts take their places. Hugging Face's keeps decoding them (padding) until the whole batch has ended or
reached ``max_new_tokens`` (256 by default in this mode), and the next batch starts after it. Generated tokens/s
counts real tokens only (each answer up to and including its end token); the table adds the mean answer length and how
many answers ended with an end token rather than at the cap. Sampled answers differ between the two (each has its own
random draws; Hugging Face's are seeded with ``--seed`` before every call, so its rounds repeat the same answers as
fabric-align's, keyed by prompt, do): their lengths differ by chance, hence the per-token rate. Greedy answers are the
same work for both and are compared token by token.

    python benchmarks/spin_generation.py                          # CPU: llama-small, fp32, 32 prompts x 128 tokens
    python benchmarks/spin_generation.py --threads 1              # one torch thread
    python benchmarks/spin_generation.py --device cuda --config qwen0.5b --prompts 256 --batch-size 64
    python benchmarks/spin_generation.py --model smollm2 --threads 1   # real model, mixed prompts, real end tokens
    python benchmarks/spin_generation.py --model smollm2 --threads 1 --max-length 256   # as SPIN decodes under
                                                                                        # data.max_length

``--profile``: after the timed rounds, each method decodes once more (the first mode) under ``torch.profiler``, the
first ``--batch-size`` prompts for at most 64 new tokens (the profiler keeps every op's event: a whole run's would
take many GB); the script prints the share of CPU time in matrix products (``mm``/``addmm``/``bmm``), in attention
(``scaled_dot_product_*``) and in everything else, and each method's busiest ops: where a decode step's time goes.

``--max-length L``: what SPIN keeps of an answer is ``L - len(prompt)`` tokens at most (``data.max_length``).
fabric-align's ``generate`` stops each row there (``max_length=L``); Hugging Face's ``generate`` has no per-row limit
(its ``max_length`` counts the padded batch width, so it would cut short prompts' answers early), so it decodes up to
``max_new_tokens`` as SPIN's users run it, and each answer is cut afterwards; ``fabric-align-uncapped`` is
fabric-align's ``generate`` without the limit, cut the same way. Tokens/s counts the kept tokens for all three.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kto_step import CONFIGS, environment  # noqa: E402

MODES = {"sample": {"temperature": 1.0, "top_p": 1.0}, "greedy": {"temperature": 0.0, "top_p": 1.0}}
BOS, EOS, PAD = 256, 257, 258
SMOLLM2 = "smollm2-135m-instruct"

# User requests for --model smollm2, of very different lengths: one-line questions, requests of a few sentences, and
# texts of 70-170 words to summarize, continue, review or answer about. Written for this benchmark.
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Name three primary colors.",
    "What is 12 times 9?",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.",
    "What does CPU stand for?",
    "Is a tomato a fruit or a vegetable?",
    "What is the largest planet in the solar system?",
    "Say hello.",
    "I have a small balcony that gets about four hours of direct sun each afternoon. Which herbs would grow well "
    "there, and how often should I water them during a hot summer?",
    "Explain the difference between a list and a tuple in Python, and give one situation where you would prefer "
    "each of them.",
    "My bread keeps coming out dense and flat even though I follow the recipe. What are the most common reasons for "
    "this, and how can I fix them?",
    "Write a short, friendly email to a colleague asking whether we can move our Thursday meeting to Friday morning "
    "because of a dentist appointment.",
    "What causes the seasons on Earth? Many people think it is the distance from the Sun; is that right?",
    "Suggest a simple weekly exercise plan for a beginner who can spare thirty minutes a day and has no equipment "
    "at home.",
    "Compare trains and planes for a 600 kilometre trip in Europe, considering cost, total travel time including "
    "airports, and environmental impact.",
    "How does compound interest work? Please illustrate with 1000 dollars saved at 5 percent per year for ten years.",
    "Write a haiku about autumn leaves falling into a quiet river, then explain the imagery you chose.",
    "What should I check before buying a used bicycle from a stranger, and which problems are expensive to repair?",
    "Summarize the following announcement in two sentences.\n\nThe town council is pleased to announce that the "
    "public library on Elm Street will close for renovation from the first of March until the end of August. During "
    "this period, a temporary branch will operate from the community hall next to the railway station, open Tuesday "
    "to Saturday from ten in the morning until six in the evening. Borrowed books may be returned to either "
    "location, and no late fees will be charged while the main building is closed. The renovation will add a "
    "children's reading room, a quiet study area with forty desks, step-free access at the main entrance and new "
    "heating that is expected to halve the building's energy use. Residents who would like to follow the progress "
    "can join guided tours of the site on the first Saturday of each month; places are limited and must be booked "
    "in advance at the temporary branch. The council thanks everyone for their patience and looks forward to "
    "welcoming readers back in September.",
    "Continue this story for one more paragraph.\n\nThe lighthouse keeper had not seen a ship in eleven days when "
    "the fog finally lifted. From the gallery he could see the whole bay at once: the broken pier, the gulls "
    "circling the fishing boats that had not gone out all week, and, far beyond the headland, a small sailing boat "
    "with a torn red sail drifting towards the rocks. Nobody on board seemed to be steering. He watched it through "
    "the old brass telescope for a long minute, counting the seconds between the waves that lifted it, and then he "
    "went down the spiral stairs two steps at a time, took the lantern from its hook by the door and ran along the "
    "cliff path towards the cove where his own rowing boat was tied.",
    "Here is a Python function that is supposed to return the average of the positive numbers in a list, but it "
    "sometimes crashes. Find the bug and suggest a fix.\n\n"
    "def average_positive(values):\n"
    "    total = 0\n"
    "    count = 0\n"
    "    for v in values:\n"
    "        if v > 0:\n"
    "            total += v\n"
    "        count += 1\n"
    "    return total / count\n\n"
    "For example average_positive([1, -2, 3]) returns 1.33 instead of 2, and average_positive([]) raises an error.",
    "Draft a polite reply to this customer message.\n\nHello, I ordered a pair of walking boots from your shop "
    "three weeks ago and paid for express delivery, which your website said would take two working days. The boots "
    "arrived after nine days, and when I opened the box the left boot was a size 42 while the right one was a size "
    "43. I have tried to call your customer service line four times, but every time I waited more than twenty "
    "minutes and then the call was cut off. I would like either a correct pair sent to me this week at no extra "
    "cost, or a full refund including the express delivery charge. I still have the original box and the receipt. "
    "I have been a customer for many years and I have always been happy until now, so I hope this can be sorted "
    "out quickly. Best regards, Maria.",
    "List the action items from these meeting notes, with the person responsible for each.\n\nNotes from the "
    "project meeting on Monday. Present: Ana, Ben, Chloe, David. Ana reported that the survey results are in and "
    "will be shared after she removes personal data, probably by Wednesday. Ben said the new website design is "
    "nearly finished but the contact form still sends messages to an old address; he will fix it before the launch. "
    "Chloe raised that the budget for printing posters is lower than expected and proposed asking the sponsor for "
    "an extra 300 euros; David agreed to write to the sponsor. The launch date stays on the 14th. Chloe will book "
    "the room for the launch event and order coffee for about fifty people. Next meeting: Monday at the same time.",
    "Give three advantages and three disadvantages of this product, based only on its description.\n\nThe "
    "TrailLight 400 is a rechargeable head torch for running and hiking. It weighs 85 grams with its battery and "
    "gives up to 400 lumens on the brightest setting, which lasts about two hours; on the lowest setting the battery "
    "lasts forty hours. It charges through a USB-C port in three hours and is rated waterproof to one metre for "
    "thirty minutes. The strap is elastic and washable. A red light mode preserves night vision. The battery is "
    "built in and cannot be replaced by the user, and the torch has no lock mode, so it can switch on by accident "
    "in a bag. It costs 79 euros and comes with a two-year warranty.",
    "Explain, for a curious teenager, why the printing press mattered so much in European history. Here is some "
    "context to use.\n\nBefore the middle of the fifteenth century, books in Europe were copied by hand, mostly in "
    "monasteries and later in workshops in university towns, and a single book could take months to produce. "
    "Around 1450 Johannes Gutenberg in Mainz combined movable metal type, an oil-based ink and a press adapted from "
    "those used for wine and paper. Within fifty years, printing shops had opened in more than two hundred European "
    "cities and millions of copies had been printed. Prices of books fell, pamphlets could spread news and "
    "arguments within weeks, and the same text could be read identically in many places at once, which changed "
    "scholarship, religion and politics.",
    "Turn these recipe steps into a shopping list grouped by section of the supermarket.\n\n1. Fry two chopped "
    "onions and three cloves of garlic in olive oil until soft. 2. Add 500 grams of minced beef and brown it. 3. Stir "
    "in two tins of chopped tomatoes, a spoon of tomato paste, a teaspoon of dried oregano and a bay leaf. 4. "
    "Simmer for forty minutes, then season with salt and black pepper. 5. Meanwhile cook 400 grams of spaghetti in "
    "salted water. 6. Serve with grated parmesan and a few fresh basil leaves, and a green salad with lemon juice "
    "dressing on the side.",
    "What are the main claims in this paragraph, and which of them would need more evidence?\n\nSleep researchers "
    "have long known that adults who regularly sleep less than six hours a night report more difficulty "
    "concentrating. A recent study of two thousand office workers found that those who kept a fixed bedtime, even at "
    "weekends, made fewer errors in an attention test than those whose bedtime varied by more than an hour. The "
    "authors conclude that a regular schedule matters more than total sleep time, and that companies should "
    "therefore forbid emails after nine in the evening. They also suggest that the effect is stronger in people "
    "over forty, although only a tenth of the participants were in that age group.",
    "Check this travel plan for problems and tell me what to change.\n\nDay 1: arrive in Lisbon at 22:40, check in "
    "at the hotel near the airport. Day 2: morning walking tour of Alfama at 9:00 in the old town, afternoon train "
    "to Porto at 13:05, which takes about three hours. Day 2 evening: dinner reservation in Lisbon at 19:30. Day 3: "
    "boat trip on the Douro river from 8:00 to 18:00, then a night bus back to Lisbon at 18:15. Day 4: flight home "
    "at 7:10 from Lisbon, so leave the hotel at 6:30.",
]


def build_model(config_name: str, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(CONFIGS[config_name])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False)


def make_prompts(n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(256) for _ in range(rng.randint(min_len, max_len) - 1)] for _ in range(n)]


def chat_prompts(tokenizer: object, n: int) -> list[list[int]]:
    """``n`` prompts rendered with the chat template, generation prompt included: ``QUESTIONS`` evenly spread when
    ``n`` is smaller (so a few prompts still mix short and long ones), all of them in turn when it is larger."""
    count = len(QUESTIONS)
    prompts = []
    for i in range(n):
        messages = [{"role": "user", "content": QUESTIONS[i * count // n if n <= count else i % count]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has its own specials
    return prompts


def load_smollm2(device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, list[int], int, object]:
    """SmolLM2-135M-Instruct from fabric-align's model cache: the model, its end tokens, pad token and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fabric_align.modeling import end_token_ids
    from fabric_align.models import fetch

    path = fetch(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval().requires_grad_(False)
    return model, end_token_ids(model, tokenizer), tokenizer.pad_token_id, tokenizer


def cut_at_end(tokens: list[int], ends: Sequence[int]) -> list[int]:
    """An answer up to and including its first end token (all of it when it has none)."""
    end = next((j for j, token in enumerate(tokens) if token in ends), None)
    return tokens if end is None else tokens[: end + 1]


def fabric_align_generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    mode: dict[str, float],
    batch_size: int,
    max_new_tokens: int,
    ends: Sequence[int] = (EOS,),
    pad: int = PAD,
    max_length: int | None = None,
) -> list[list[int]]:
    from fabric_align.generation import generate

    return generate(
        model,
        prompts,
        keys=list(range(len(prompts))),
        eos_id=list(ends),
        pad_id=pad,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        show_progress=False,
        **mode,
    )


def fabric_align_uncapped(
    model: torch.nn.Module, prompts: list[list[int]], *args: Any, max_length: int | None = None
) -> list[list[int]]:
    """fabric-align's ``generate`` without its per-row limit, each answer cut to ``max_length`` afterwards."""
    return fit(prompts, fabric_align_generate(model, prompts, *args), max_length)


def fit(prompts: list[list[int]], answers: list[list[int]], max_length: int | None) -> list[list[int]]:
    """Each answer as SPIN keeps it: at most ``max_length - len(prompt)`` tokens."""
    if max_length is None:
        return answers
    return [answer[: max_length - len(prompt)] for prompt, answer in zip(prompts, answers, strict=True)]


def hf_generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    mode: dict[str, float],
    batch_size: int,
    max_new_tokens: int,
    ends: Sequence[int] = (EOS,),
    pad: int = PAD,
    max_length: int | None = None,
) -> list[list[int]]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the same batches as fabric-align
    results: list[list[int]] = [[] for _ in prompts]
    sampling = mode["temperature"] > 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=mode["temperature"] if sampling else None,
            top_p=mode["top_p"] if sampling else None,
            top_k=0 if sampling else None,
            eos_token_id=list(ends),  # every end token stops a row (a row that has ended then gets padding)
            pad_token_id=pad,
            use_cache=True,
            cache=DynamicCache(),  # transformers 5.x name (`past_key_values` warns)
        )
        for row, i in enumerate(batch):
            results[i] = cut_at_end(out[row, width:].tolist(), ends)
    return fit(prompts, results, max_length)


METHODS: dict[str, Callable[..., list[list[int]]]] = {
    "fabric-align": fabric_align_generate,
    "hf": hf_generate,
    "fabric-align-uncapped": fabric_align_uncapped,  # only with --max-length
}


def timed(fn: Callable[[], list[list[int]]], device: str) -> tuple[float, list[list[int]]]:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--model",
        choices=("random", "smollm2"),
        default="random",
        help="random: weights from --config, random prompts, no end token; smollm2: the real SmolLM2-135M-Instruct, "
        "chat prompts of mixed lengths, its real end tokens",
    )
    parser.add_argument(
        "--config", choices=sorted(CONFIGS), default=None, help="default: llama-small on CPU, qwen0.5b on CUDA"
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=32, help="random model only")
    parser.add_argument("--max-prompt", type=int, default=128, help="random model only")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 (random model), 256 (smollm2)")
    parser.add_argument("--max-length", type=int, default=None, help="prompt + kept answer, as SPIN's data.max_length")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["sample", "greedy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="also profile one call per method (see above)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    real = args.model == "smollm2"
    max_new_tokens = args.max_new_tokens or (256 if real else 128)
    if real:
        model, ends, pad, tokenizer = load_smollm2(args.device, dtype)
        prompts = chat_prompts(tokenizer, args.prompts)
    else:
        config = args.config or ("qwen0.5b" if cuda else "llama-small")
        model = build_model(config, args.device, dtype, args.seed)
        ends, pad = [EOS], PAD
        prompts = make_prompts(args.prompts, args.min_prompt, args.max_prompt, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    env = environment(args.device)
    env["torch_threads"] = str(torch.get_num_threads())
    if real:
        lengths = sorted(len(p) for p in prompts)
        setting = (
            f"{SMOLLM2} ({n_params / 1e6:.1f}M parameters), {str(dtype).removeprefix('torch.')}, {args.device}, "
            f"{args.prompts} chat prompts of {lengths[0]}-{lengths[-1]} tokens (median "
            f"{statistics.median(lengths):.0f}), end tokens {ends}, batch size {args.batch_size}, max_new_tokens "
            f"{max_new_tokens}, {args.rounds} rounds, torch threads {torch.get_num_threads()}"
        )
    else:
        setting = (
            f"{config} ({n_params / 1e6:.1f}M parameters), {str(dtype).removeprefix('torch.')}, {args.device}, "
            f"{args.prompts} prompts of {args.min_prompt}-{args.max_prompt} tokens, batch size {args.batch_size}, "
            f"max_new_tokens {max_new_tokens}, {args.rounds} rounds, torch threads {torch.get_num_threads()}"
        )
    if args.max_length:
        setting += f", answers kept to max_length {args.max_length} - prompt"
        too_long = [len(p) for p in prompts if len(p) >= args.max_length]
        if too_long:
            parser.error(f"--max-length {args.max_length} leaves no room after prompts of {too_long} tokens")
    methods = list(METHODS) if args.max_length else ["fabric-align", "hf"]
    print(setting)
    print(json.dumps(env))

    def call(name: str, mode: str, subset: list[list[int]], batch_size: int, new_tokens: int) -> list[list[int]]:
        torch.manual_seed(args.seed)  # Hugging Face's draws: the same answers every round
        return METHODS[name](model, subset, MODES[mode], batch_size, new_tokens, ends, pad, max_length=args.max_length)

    # Warm-up: one small batch per method and mode (first-call allocations, lazy imports).
    for mode in args.modes:
        for name in methods:
            call(name, mode, prompts[:2], 2, 4)

    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        times: dict[str, list[float]] = {name: [] for name in methods}
        tokens: dict[str, int] = {}
        outputs: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            names = methods if r % 2 == 0 else methods[::-1]
            for name in names:
                seconds, out = timed(
                    lambda name=name, mode=mode: call(name, mode, prompts, args.batch_size, max_new_tokens),
                    args.device,
                )
                times[name].append(seconds)
                tokens[name] = sum(len(o) for o in out)
                outputs[name] = out
                print(f"  {mode} round {r} {name}: {seconds:.2f} s, {tokens[name]} tokens", flush=True)
        row = {}
        for name in methods:
            median = statistics.median(times[name])
            row[name] = {
                "seconds": median,
                "tokens": tokens[name],
                "tokens_per_s": tokens[name] / median,
                "all": times[name],
            }
            if real:
                out = outputs[name]
                row[name]["mean_answer_tokens"] = tokens[name] / len(out)
                row[name]["ended"] = sum(bool(o) and o[-1] in ends for o in out)
        if mode == "greedy":
            a, b = outputs["fabric-align"], outputs["hf"]
            same = sum(x == y for x, y in zip(a, b, strict=True))
            row["greedy_identical"] = f"{same}/{len(a)}"
            if real:
                # Where the others part: the tokens they agree on before the first difference.
                row["greedy_common_prefix"] = [common_prefix(x, y) for x, y in zip(a, b, strict=True) if x != y]
        if args.max_length:  # the per-row limit saves work only: the kept answers must be the same
            a, b = outputs["fabric-align"], outputs["fabric-align-uncapped"]
            row["capped_identical_to_uncapped"] = f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"
        results[mode] = row

    if real:
        lines = [
            "| mode | fabric-align tokens/s | HF generate tokens/s | speed-up | generated tokens (fabric-align / HF) "
            "| mean answer length, tokens (fabric-align / HF) | answers ended by an end token (fabric-align / HF) |",
            "|---|---|---|---|---|---|---|",
        ]
    else:
        lines = [
            "| mode | fabric-align tokens/s | HF generate tokens/s | speed-up | generated tokens (fabric-align / HF) |",
            "|---|---|---|---|---|",
        ]
    for mode, row in results.items():
        fa, hf = row["fabric-align"], row["hf"]
        line = (
            f"| {mode} | {fa['tokens_per_s']:.0f} | {hf['tokens_per_s']:.0f} | "
            f"{fa['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {fa['tokens']} / {hf['tokens']} |"
        )
        if real:
            line += (
                f" {fa['mean_answer_tokens']:.1f} / {hf['mean_answer_tokens']:.1f} | {fa['ended']}/{args.prompts} / "
                f"{hf['ended']}/{args.prompts} |"
            )
        lines.append(line)
    for mode, row in results.items():
        if args.max_length:
            fa, uncapped = row["fabric-align"], row["fabric-align-uncapped"]
            gain = fa["tokens_per_s"] / uncapped["tokens_per_s"]
            lines.append(
                f"\n{mode}: fabric-align-uncapped {uncapped['tokens_per_s']:.0f} tokens/s "
                f"({uncapped['seconds']:.1f} s); "
                f"the per-row limit: {gain:.2f}x; kept answers identical: {row['capped_identical_to_uncapped']}"
            )
    if "greedy" in results:
        lines.append(f"\ngreedy outputs identical (fabric-align vs HF): {results['greedy']['greedy_identical']}")
        if real and results["greedy"]["greedy_common_prefix"]:
            lines[-1] += f" (the others agree on their first {results['greedy']['greedy_common_prefix']} tokens)"
    if args.profile:
        mode = args.modes[0]
        subset, new_tokens = prompts[: args.batch_size], min(max_new_tokens, 64)
        for name in methods:
            work = lambda name=name: call(name, mode, subset, args.batch_size, new_tokens)  # noqa: E731
            lines.append(f"\n{mode}, {name}, {len(subset)} prompts x up to {new_tokens} tokens: " + profile_call(work))
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"setting": setting, "env": env, "results": results, "table": table}, indent=2))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_call(fn: Callable[[], Any]) -> str:
    """Run ``fn`` once under ``torch.profiler``: the shares of self CPU time in matrix products, in attention and in
    the rest, and the five busiest ops."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    busiest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return (
        f"{total / 1e6:.1f} s of CPU time: matrix products {100 * matmul / total:.0f}%, attention "
        f"{100 * attention / total:.0f}%, the rest {100 * (total - matmul - attention) / total:.0f}%; busiest: "
        + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}% ({e.count} calls)" for e in busiest)
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    main()
