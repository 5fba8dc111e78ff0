"""Build the embedded tiny model directory: a Llama-style config and a byte-level tokenizer with a chat template.

The directory holds no weights: the loader initializes them randomly (seeded) from the config, which keeps the
repo small and the default run free of downloads. Re-run with ``python -m fabric_align.assets.build_tiny``; a
test checks the shipped files equal what this script builds.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_DIR = Path(__file__).parent / "tiny-llama"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]

# Every turn is `<|role|>\n{content}</s>`; the generation prompt opens an assistant turn. The assistant's answer
# therefore ends in EOS, which is what generation stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    # GPT-2's reversible byte -> printable-unicode map, so each of the 256 bytes is one token.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codepoints = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codepoints.append(256 + extra)
            extra += 1
    mapping = dict(zip(printable, codepoints, strict=True))
    return [chr(mapping[b]) for b in range(256)]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 264,  # 256 bytes + 6 special tokens, padded to a multiple of 8
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "pad_token_id": 258,
        "dtype": "float32",
    }


def build(out_dir: Path = TINY_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(out_dir)
    (out_dir / "config.json").write_text(json.dumps(model_config(), indent=2) + "\n")
    return out_dir


if __name__ == "__main__":
    print(f"wrote {build()}")
