"""The trainers on a real pretrained model (SmolLM2-135M-Instruct: a BPE tokenizer with a ChatML template and two end
tokens, tied embeddings, 30 layers): chat rows render as the template says, KTO and SPIN train with LoRA, both exports
reload with transformers and peft, decoding stops at every end token, and FSDP2 on 2 processes matches 1 process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fabric_align import kto, spin
from fabric_align.args import ModelArgs
from fabric_align.data import ChatRenderer
from fabric_align.modeling import end_token_ids, load_tokenizer

from conftest import (
    assert_no_unactionable_warnings,
    column,
    fabric_cli,
    read_metrics,
    run_cli,
    run_script,
    write_jsonl,
)

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("What is the capital of France?", "Paris.", "London."),
    ("What is 2 + 2?", "4.", "5."),
    ("Name a primary color.", "Red.", "Brown."),
    ("What do bees make?", "Honey.", "Milk."),
    ("Which planet do we live on?", "Earth.", "Mars."),
    ("What is frozen water called?", "Ice.", "Steam."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What color is the sky on a clear day?", "Blue.", "Green."),
]
SMALL = ["--logger.backend=csv", "--data.max_length=64", "--train.save_interval=null", "--train.warmup_steps=0"]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def kto_rows() -> list[dict[str, Any]]:
    rows = []
    for question, good, bad in QUESTIONS:
        rows.append({"prompt": chat(question), "completion": [{"role": "assistant", "content": good}], "label": True})
        rows.append({"prompt": chat(question), "completion": [{"role": "assistant", "content": bad}], "label": False})
    return rows


def sft_rows() -> list[dict[str, Any]]:
    return [{"messages": [*chat(q), {"role": "assistant", "content": a}]} for q, a, _ in QUESTIONS]


def test_chat_rows_render_with_the_real_template(model_dir: Path) -> None:
    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(model_dir)))
    renderer = ChatRenderer(tokenizer)
    encoded = renderer.encode(chat("What is the capital of France?"), [{"role": "assistant", "content": "Paris."}])
    prompt = tokenizer.decode(encoded.prompt_ids)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("What is the capital of France?") == 1
    # The answer ends with exactly one <|im_end|>: the template's own, not a second one appended after its newline.
    assert tokenizer.decode(encoded.completion_ids) == "Paris.<|im_end|>"
    with_system = renderer.encode(
        [{"role": "system", "content": "Answer in one word."}, *chat("Capital of France?")], "Paris."
    )
    text = tokenizer.decode(with_system.prompt_ids)
    assert text.count("<|im_start|>system") == 1 and "Answer in one word." in text
    assert tokenizer("x")["input_ids"] == tokenizer("x", add_special_tokens=False)["input_ids"]  # no BOS added
    assert encoded.prompt_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


@pytest.fixture(scope="module")
def kto_lora(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kto-real")
    data = write_jsonl(root / "train.jsonl", kto_rows())
    out = root / "out"
    run_cli(
        kto.setup,
        [
            *SMALL,
            f"--model.name_or_path={model_dir}",
            "--model.lora.r=8",
            "--model.lora.alpha=16",
            "--model.lora.merge_on_export=true",
            f"--data.train_path={data}",
            f"--data.val_path={data}",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=4",
            "--train.max_steps=4",
            "--train.eval_interval=4",
            "--train.lr=2e-3",
            f"--out_dir={out}",
        ],
    )
    return out


def test_kto_with_lora_learns_the_preferred_answers(kto_lora: Path) -> None:
    rows = read_metrics(kto_lora)
    assert column(rows, "train/step") == [1, 2, 3, 4]
    margins = column(rows, "val/rewards/margins")
    assert len(margins) == 2 and margins[0] == pytest.approx(0.0, abs=1e-4) and margins[1] > 0.05


def test_lora_exports_reload_with_peft_and_transformers(kto_lora: Path, model_dir: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapter = AutoPeftModelForCausalLM.from_pretrained(str(kto_lora / "final")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(kto_lora / "final" / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = load_tokenizer(ModelArgs(name_or_path=str(model_dir)))("Bees make honey.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = [m(ids).logits for m in (adapter, merged, base)]
    torch.testing.assert_close(logits[0], logits[1], atol=2e-4, rtol=1e-4)
    assert (logits[1] - logits[2]).abs().max() > 1e-3  # the adapter was trained
    assert merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    # The merged model stops where the base does: its generation config (both end tokens) came along.
    assert merged.generation_config.eos_token_id == base.generation_config.eos_token_id == [2, 0]


def test_spin_with_lora_on_the_real_model(model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    out = tmp_path / "out"
    run_cli(
        spin.setup,
        [
            *SMALL,
            f"--model.name_or_path={model_dir}",
            "--model.lora.r=8",
            "--model.lora.alpha=16",
            f"--data.train_path={data}",
            f"--data.val_path={data}",
            "--train.global_batch_size=4",
            "--train.micro_batch_size=4",
            "--train.eval_interval=2",
            "--train.lr=2e-3",
            "--spin.iterations=1",
            "--spin.epochs_per_iteration=1",
            "--spin.max_new_tokens=12",
            f"--out_dir={out}",
        ],
    )
    rows = read_metrics(out)
    assert column(rows, "train/step") == [1, 2]
    assert len(column(rows, "val/nll")) == 2 and all(v > 0 for v in column(rows, "val/nll"))
    pairs = torch.load(out / "iter-0" / "pairs.pt", weights_only=True)
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(model_dir)))
    ends = set(end_token_ids(AutoModelForCausalLM.from_pretrained(str(model_dir)), tokenizer))
    assert len(ends) >= 2  # <|im_end|> and <|endoftext|>
    for answer in pairs["generated"]["train"]:
        assert not ends & set(answer[:-1])  # decoding stopped at the first end token it drew
        assert answer[-1] in ends or len(answer) == 12
    generations = [json.loads(line) for line in (out / "iter-0" / "generations.jsonl").read_text().splitlines()]
    assert all(g["prompt"].startswith("<|im_start|>system") for g in generations)


def test_fsdp2_on_two_processes_matches_one_with_tied_embeddings(model_dir: Path, tmp_path: Path) -> None:
    """Full fine-tuning of the tied-embedding model: FSDP2 over 2 gloo processes (rank 0 reads the weights, the other
    builds on the meta device) gives the one-process losses and the same exported weights."""
    data = write_jsonl(tmp_path / "train.jsonl", kto_rows())
    args = [
        *SMALL,
        f"--model.name_or_path={model_dir}",
        f"--data.train_path={data}",
        "--data.val_path=null",
        "--train.global_batch_size=8",
        "--train.max_steps=2",
        "--train.lr=1e-5",
    ]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run_cli(kto.setup, [*args, "--train.micro_batch_size=4", f"--out_dir={single}"])
    result = run_script(
        "kto.py",
        [*args, "--train.micro_batch_size=2", "--strategy=fsdp", f"--out_dir={fsdp}"],
        launcher=[*fabric_cli(), "--accelerator=cpu", "--devices=2"],
        timeout=900,
    )
    assert_no_unactionable_warnings(result.stdout + result.stderr)
    for key in ("train/loss", "train/kl", "train/grad_norm"):
        torch.testing.assert_close(
            torch.tensor(column(read_metrics(single), key)),
            torch.tensor(column(read_metrics(fsdp), key)),
            rtol=1e-4,
            atol=1e-5,
            msg=key,
        )
    from safetensors.torch import load_file

    a, b = load_file(single / "final" / "model.safetensors"), load_file(fsdp / "final" / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # tied: stored once
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
