"""Data plumbing: formats, masking, EOS, truncation, KL pairing and the step plan."""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from fabric_align import kto
from fabric_align.args import ModelArgs
from fabric_align.data import (
    IGNORE_INDEX,
    ChatRenderer,
    DataError,
    StepPlan,
    derangement,
    pad_sequences,
    shard_by_length,
)
from fabric_align.kto import load_split
from fabric_align.modeling import load_tokenizer

from conftest import FAST, column, read_metrics, run_cli, write_jsonl


@pytest.fixture(scope="module")
def renderer() -> ChatRenderer:
    return ChatRenderer(load_tokenizer(ModelArgs()))


def test_three_row_forms_give_the_same_tokens(tmp_path: Path, renderer: ChatRenderer) -> None:
    rows = [
        {"prompt": "Hi there", "completion": "Hello!", "label": True},
        {"prompt": "Hi there", "response": "Hello!", "preference": "chosen"},
        {"prompt": "Hi there", "completion": "Go away", "label": "rejected"},
        {
            "prompt": [{"role": "user", "content": "Hi there"}],
            "completion": [{"role": "assistant", "content": "Hello!"}],
            "label": False,
        },
    ]
    data = load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", renderer, 64, seed=0, train=True)
    tok = renderer.tokenizer
    assert data.labels.tolist() == [True, True, False, False]
    # TRL plain and NeMo forms are the same example.
    assert data.sequences[0] == data.sequences[1]
    ids, prompt_len = data.sequences[0]
    assert ids[:prompt_len] == tok("Hi there")["input_ids"]  # BOS + prompt bytes
    assert ids[prompt_len:] == tok("Hello!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Conversational: the chat template's generation prompt ends the prompt; the completion ends in one EOS.
    conv_ids, conv_len = data.sequences[3]
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(conv_ids[:conv_len]) == prompt_text
    assert tok.decode(conv_ids[conv_len:]) == "Hello!" + tok.eos_token
    assert conv_ids.count(tok.eos_token_id) == 2  # the user turn's and the answer's


def test_eos_not_doubled_and_truncation_keeps_prompt(tmp_path: Path, renderer: ChatRenderer) -> None:
    eos = renderer.tokenizer.eos_token
    rows = [
        {"prompt": "p" * 10, "completion": "already ends" + eos, "label": True},
        {"prompt": "q" * 10, "completion": "c" * 100, "label": False},  # cut to fit
        {"prompt": "r" * 40, "completion": "dropped", "label": False},  # prompt alone does not fit
        {"prompt": "s", "completion": "t", "label": True},
    ]
    data = load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", renderer, 32, seed=0, train=True)
    assert len(data) == 3
    first, first_len = data.sequences[0]
    assert first[first_len:].count(renderer.tokenizer.eos_token_id) == 1
    cut, cut_len = data.sequences[1]
    assert len(cut) == 32 and cut_len == 11  # BOS + 10 prompt bytes kept whole
    assert data.sequences[2][0][-1] == renderer.tokenizer.eos_token_id


def test_kl_pairs_are_a_derangement_of_completions(tmp_path: Path, renderer: ChatRenderer) -> None:
    rows = [{"prompt": f"prompt {i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(9)]
    data = load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", renderer, 64, seed=3, train=True)
    tok = renderer.tokenizer
    partners = []
    for (ids, n), (kl_ids, kl_n) in zip(data.sequences, data.kl_sequences, strict=True):
        assert kl_ids[:kl_n] == ids[:n]  # same prompt x_i
        completion = tok.decode(kl_ids[kl_n:-1])
        partners.append(int(completion.split()[-1]))
    assert sorted(partners) == list(range(9))
    assert all(p != i for i, p in enumerate(partners))
    assert derangement(9, 3) == derangement(9, 3) and derangement(9, 3) != derangement(9, 4)


def test_padding_and_targets_mask_prompt_and_padding() -> None:
    batch = pad_sequences([([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    i = IGNORE_INDEX
    assert batch["targets"].tolist() == [[i, 3, 4, 5], [7, 8, i, i]]


@pytest.mark.parametrize(("world_size", "micro"), [(1, 2), (1, 8), (2, 4), (4, 1)])
def test_step_plan_is_the_same_global_batch_for_any_split(world_size: int, micro: int) -> None:
    plan = StepPlan(num_examples=37, global_batch_size=8, seed=5)
    for step in (0, 3, 4, 9):  # 4 steps per epoch: 9 is in the third epoch
        seen = [i for r in range(world_size) for mb in plan.micro_batches(step, r, world_size, micro) for i in mb]
        assert seen == plan.global_indices(step)
    epoch0 = [i for s in range(4) for i in plan.global_indices(s)]
    assert len(set(epoch0)) == 32 and plan.global_indices(4) != plan.global_indices(0)


@pytest.mark.parametrize(("world_size", "micro"), [(1, 2), (2, 2), (2, 1), (4, 1)])
def test_a_step_grouped_by_length_reads_the_same_examples_and_pads_less(world_size: int, micro: int) -> None:
    """With lengths, each step's examples are the same, cut into micro-batches of similar lengths, dealt so that
    every rank gets as many micro-batches and a similar share of the tokens; less padding overall."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(8, 512) for _ in range(64)]
    plain = StepPlan(num_examples=64, global_batch_size=16, seed=3)
    grouped = StepPlan(num_examples=64, global_batch_size=16, seed=3, lengths=lengths)
    padded = {"plain": 0, "grouped": 0}
    for step in range(8):
        for name, plan in (("plain", plain), ("grouped", grouped)):
            shares = [plan.micro_batches(step, r, world_size, micro) for r in range(world_size)]
            assert sorted(i for share in shares for mb in share for i in mb) == sorted(plain.global_indices(step))
            assert {len(share) for share in shares} == {16 // (world_size * micro)}
            assert all(len(mb) == micro for share in shares for mb in share)
            # padding: the tokens a micro-batch adds to reach its longest row
            padded[name] += sum(
                max(lengths[i] for i in mb) - lengths[j] for share in shares for mb in share for j in mb
            )
        shares = [grouped.micro_batches(step, r, world_size, micro) for r in range(world_size)]
        ranked = sorted(lengths[i] for i in grouped.global_indices(step))
        spans = [(min(lengths[i] for i in mb), max(lengths[i] for i in mb)) for share in shares for mb in share]
        for a, b in itertools.combinations(spans, 2):  # micro-batches hold neighbours in length order: no overlap
            assert a[1] <= b[0] or b[1] <= a[0], (a, b)
        if world_size > 1:  # back-and-forth dealing: the ranks' token counts are within one group's worth
            work = [sum(lengths[i] for mb in share for i in mb) for share in shares]
            assert max(work) - min(work) <= micro * (ranked[-1] - ranked[0])
    if micro > 1:
        assert padded["grouped"] < 0.6 * padded["plain"], padded


@pytest.mark.parametrize(("num_items", "world_size", "micro"), [(11, 3, 2), (8, 2, 4), (5, 1, 2), (1, 2, 1)])
def test_shard_by_length_covers_everything_once_with_equal_shares_of_neighbours(
    num_items: int, world_size: int, micro: int
) -> None:
    lengths = [(7 * i) % 13 + 1 for i in range(num_items)]
    shares = [shard_by_length(lengths, r, world_size, micro) for r in range(world_size)]
    per_rank = math.ceil(math.ceil(num_items / world_size) / micro)  # micro-batches
    assert [len(s) for s in shares] == [per_rank] * world_size  # the same number of forwards on every rank
    assert all(len(mb) == micro for s in shares for mb in s)
    assert sorted(i for s in shares for mb in s for i in mb if i >= 0) == list(range(num_items))
    spans = [[lengths[i] for i in mb if i >= 0] for s in shares for mb in s]
    spans = [(min(x), max(x)) for x in spans if x]
    for a, b in itertools.combinations(spans, 2):
        assert a[1] <= b[0] or b[1] <= a[0], (a, b)


def test_plain_strings_dataset_from_parquet_and_json(tmp_path: Path, renderer: ChatRenderer) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": bool(i % 2)} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    a = load_split(str(tmp_path / "d.parquet"), "train", renderer, 64, seed=0, train=True)
    b = load_split(str(tmp_path / "d.json"), "train", renderer, 64, seed=0, train=True)
    assert a.sequences == b.sequences and torch.equal(a.labels, b.labels)


def test_dataset_directory_through_datasets(tmp_path: Path, renderer: ChatRenderer) -> None:
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": bool(i % 2)} for i in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    data = load_split(str(tmp_path / "ds"), "train", renderer, 64, seed=0, train=True)
    assert len(data) == 4 and data.source.endswith("[train]")


def test_a_folder_of_data_files_reads_the_rows_datasets_would_and_names_a_bad_rows_file_and_line(
    tmp_path: Path, renderer: ChatRenderer
) -> None:
    """A folder of data files gives each split the rows `datasets.load_dataset` gives it (its file naming rules, its
    file order), read here: a bad row is named by its file and line, not lost in a dataset-builder error."""
    import datasets

    from fabric_align.data import read_rows

    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    for shard in range(2):
        write_jsonl(
            folder / "data" / f"train-0000{shard}-of-00002.jsonl",
            [{"prompt": f"p{shard}{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(3)],
        )
    write_jsonl(
        folder / "data" / "test-00000-of-00001.jsonl",
        [{"prompt": f"t{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(3)],
    )
    for split in ("train", "test"):
        expected = list(datasets.load_dataset(str(folder), split=split))
        assert [row.value for row in read_rows(str(folder), split)] == expected
    assert len(load_split(str(folder), "train", renderer, 64, seed=0, train=True)) == 6
    assert len(load_split(str(folder), "test", renderer, 64, seed=0, train=False)) == 3
    sliced = [row.value for row in read_rows(str(folder), "train[:2]+test[-1:]")]  # datasets' split syntax
    assert sliced == list(datasets.load_dataset(str(folder), split="train[:2]+test[-1:]"))
    with pytest.raises(DataError, match=r"my-dataset: no split 'validation' \(its files make \['test', 'train'\]\)"):
        read_rows(str(folder), "validation")
    bad = folder / "data" / "train-00001-of-00002.jsonl"
    bad.write_text(bad.read_text() + '{"prompt": "p", "completion": \n')
    with pytest.raises(DataError, match=r"train-00001-of-00002.jsonl, line 4, field '<json>': malformed JSON"):
        read_rows(str(folder), "train")
    # A CSV's values are the text written: the label "true" is read as the boolean when the row is parsed.
    other = tmp_path / "csv-dataset"
    other.mkdir()
    (other / "train.csv").write_text("prompt,completion,label\np,c,true\n")
    assert [row.value for row in read_rows(str(other), "train")] == [
        {"prompt": "p", "completion": "c", "label": "true"}
    ]
    # A label column that mixes forms reads as text: "true" and "False" are still booleans.
    (other / "train.csv").write_text("prompt,completion,label\np,c,chosen\nq,d,False\nr,e,true\n")
    labels = load_split(str(other), "train", renderer, 64, seed=0, train=True).labels
    assert labels.tolist() == [True, False, True]


def test_a_folders_files_that_no_split_reads_are_named_and_mixed_kinds_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """datasets' naming rules read ``train.jsonl`` for the train split and leave ``more.jsonl`` out; with several
    kinds of files in a split it reads the most common kind only. Neither may drop rows without a word."""
    from fabric_align.data import read_rows

    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(3)]
    folder = tmp_path / "named"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "more.jsonl", rows)
    (folder / "README.md").write_text("notes, not data\n")
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        assert len(read_rows(str(folder), "train")) == 3
    assert (
        "named: 1 file(s) no split reads under datasets' naming rules (the splits: train 1 file(s)): more.jsonl;"
        in caplog.text
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", rows)
    for name in ("b.csv", "c.csv"):
        (mixed / name).write_text("prompt,completion,label\np,c,true\n")
    with pytest.raises(
        DataError, match=r"mixed: split 'train' mixes kinds of data files \(2 csv, 1 json\); keep one kind"
    ):
        read_rows(str(mixed), "train")
    # Text files beside the data (a licence, notes) are no kind of rows: neither mixed in nor named as unread.
    caplog.clear()
    licensed = tmp_path / "licensed"
    licensed.mkdir()
    write_jsonl(licensed / "data.jsonl", rows)
    (licensed / "LICENSE.txt").write_text("CC-BY-4.0\n")
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        assert len(read_rows(str(licensed), "train")) == 3
    assert "no split reads" not in caplog.text


def test_csv_tsv_and_gzipped_files_are_read_here_and_name_the_file_and_line(
    tmp_path: Path, renderer: ChatRenderer, caplog: pytest.LogCaptureFixture
) -> None:
    """Read through datasets, a CSV turned the answer "4" into an int (refused as not text) and an empty prompt into
    a missing one, and a bad row was named by a row number counted over all of a split's files, or not at all."""
    import gzip

    from fabric_align.data import read_rows

    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "train-00000-of-00002.csv").write_text('prompt,completion,label\n"What is 2+2?",4,True\n,5,False\n')
    (folder / "train-00001-of-00002.csv").write_text('prompt,completion,label\n"a, b",c,true\n"multi\nline",d,false\n')
    data = load_split(str(folder), "train", renderer, 64, seed=0, train=True)
    assert data.labels.tolist() == [True, False, True, False]
    rows = read_rows(str(folder), "train")
    assert [(r.value["prompt"], r.value["completion"], r.where) for r in rows] == [
        ("What is 2+2?", "4", "line 2"),
        ("", "5", "line 3"),
        ("a, b", "c", "line 2"),
        ("multi\nline", "d", "line 3"),
    ]
    second = folder / "train-00001-of-00002.csv"
    second.write_text("prompt,completion,label\na,b,true\nc,,false\n")
    with pytest.raises(DataError, match=r"train-00001-of-00002.csv, line 3, field 'completion': is empty"):
        load_split(str(folder), "train", renderer, 64, seed=0, train=True)
    second.write_text("prompt,completion,label\na,b,true\nc,d,false,extra\n")
    with pytest.raises(
        DataError, match=r"train-00001-of-00002.csv, line 3, field '<csv>': 4 values for the header's 3"
    ):
        read_rows(str(folder), "train")
    second.write_text("prompt,completion,prompt\na,b,c\n")
    with pytest.raises(DataError, match=r"train-00001-of-00002.csv, line 1, field 'prompt': given twice in the header"):
        read_rows(str(folder), "train")
    # A split's own problem names the folder and split when its rows come from several files.
    second.write_text("prompt,completion,label\na,b,true\n")
    (folder / "train-00000-of-00002.csv").write_text("prompt,completion,label\nc,d,true\n")
    with pytest.raises(DataError, match=r"csv\[train\], all 2 rows, field 'label': every example is desirable"):
        load_split(str(folder), "train", renderer, 64, seed=0, train=True)
    # TSV and gzipped JSON lines; a backup file the split's name takes in is left out, and named.
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    (tsv / "train.tsv").write_text("prompt\tcompletion\tlabel\np\tc, d\ttrue\n")
    assert [r.value for r in read_rows(str(tsv), "train")] == [{"prompt": "p", "completion": "c, d", "label": "true"}]
    packed = tmp_path / "packed"
    packed.mkdir()
    lines = ['{"prompt": "p", "completion": "c", "label": true}', '{"prompt": "p", "completion": 3, "label": true}']
    (packed / "train.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    write_jsonl(packed / "train.jsonl.bak", [{"prompt": "old", "completion": "old", "label": False}])
    with pytest.raises(DataError, match=r"train.jsonl.gz, line 2, field 'completion': expected a string"):
        load_split(str(packed), "train", renderer, 64, seed=0, train=True)
    (packed / "train.jsonl.gz").write_bytes(gzip.compress(lines[0].encode()))
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        assert [r.value["prompt"] for r in read_rows(str(packed), "train")] == ["p"]
    assert "no split reads under datasets' naming rules (the splits: train 1 file(s)): train.jsonl.bak;" in caplog.text
    # A kind only datasets reads (bz2) leaves the folder to it, as before; a CSV value may be longer than 128 KiB.
    import bz2

    other_packing = tmp_path / "bz2"
    other_packing.mkdir()
    (other_packing / "train.jsonl.bz2").write_bytes(bz2.compress(lines[0].encode()))
    assert [r.value["prompt"] for r in read_rows(str(other_packing), "train")] == ["p"]
    (tsv / "train.tsv").write_text(f"prompt\tcompletion\tlabel\np\t{'x' * 200_000}\ttrue\n")
    assert len(read_rows(str(tsv), "train")[0].value["completion"]) == 200_000
    # No data files at all: said so, not read as a text data set.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"notes: no data files \(.jsonl, .json, .parquet, .csv or .tsv"):
        read_rows(str(notes), "train")
    # A dataset card that sets no files (a cloned hub dataset's licence and tags) leaves the folder read here.
    (packed / "README.md").write_text("---\nlicense: mit\n---\n# my data\n")
    (packed / "train.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(DataError, match=r"train.jsonl.gz, line 2, field 'completion'"):
        load_split(str(packed), "train", renderer, 64, seed=0, train=True)


def test_a_completion_of_nothing_but_its_end_token_is_empty(tmp_path: Path, renderer: ChatRenderer) -> None:
    eos = renderer.tokenizer.eos_token
    rows = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "c", "completion": f"{eos}  ", "label": False},
    ]
    path = write_jsonl(tmp_path / "eos.jsonl", rows)
    with pytest.raises(DataError, match=r"eos.jsonl, line 2, field 'completion': is empty once its end token"):
        load_split(str(path), "train", renderer, 64, seed=0, train=True)


def test_eos_written_inside_the_text_and_multi_message_completions_are_kept_whole(
    tmp_path: Path, renderer: ChatRenderer
) -> None:
    """Only the EOS that closes the completion is replaced: a ``</s>`` inside the text, or the EOS that closes an
    earlier message of a multi-message completion, must not cut the rest of the answer away."""
    tok = renderer.tokenizer
    eos = tok.eos_token
    inside = f"The token {eos} ends it; the rest matters."
    multi = [{"role": "assistant", "content": "first part"}, {"role": "assistant", "content": "second part"}]
    single = [{"role": "assistant", "content": "first part"}]
    prompt = [{"role": "user", "content": "q"}]
    rows = [
        {"prompt": "p", "completion": inside, "label": True},
        {"prompt": prompt, "completion": multi, "label": False},
        {"prompt": prompt, "completion": single, "label": False},
    ]
    data = load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", renderer, 200, seed=0, train=True)
    ids, start = data.sequences[0]
    assert tok.decode(ids[start:], skip_special_tokens=True).endswith("the rest matters.")
    assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id
    multi_ids, multi_start = data.sequences[1]
    single_ids, single_start = data.sequences[2]
    assert "second part" in tok.decode(multi_ids[multi_start:])
    assert len(multi_ids) > len(single_ids) and multi_ids[-1] == tok.eos_token_id


def test_json_lines_split_only_at_newlines(tmp_path: Path, renderer: ChatRenderer) -> None:
    """JSON allows U+2028, U+0085 and \\x1c raw inside strings (json.dumps(ensure_ascii=False) writes them):
    they are not line breaks. A byte-order mark and CRLF line ends are accepted too."""
    rows = [
        {"prompt": f"q{i}", "completion": f"line one\u2028two\x85three\x1c{i}", "label": i % 2 == 0} for i in range(4)
    ]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    data = load_split(str(path), "train", renderer, 64, seed=0, train=True)
    assert len(data) == 4
    ids, start = data.sequences[3]
    assert renderer.tokenizer.decode(ids[start:], skip_special_tokens=True) == "line one\u2028two\x85three\x1c3"


def test_closing_eos_is_stripped_however_the_template_ends_the_turn(renderer: ChatRenderer) -> None:
    """EOS + newline (Llama-2/Mistral style), a turn-end EOS then EOS again (Phi-3 style): one EOS is appended
    afterwards, so none of these may stay; an EOS followed by more answer is kept."""
    from fabric_align.data import strip_final_eos

    tok = renderer.tokenizer
    eos, newline = tok.eos_token_id, tok("\n", add_special_tokens=False)["input_ids"]
    answer = tok("the answer", add_special_tokens=False)["input_ids"]
    assert strip_final_eos(tok, answer) == answer
    assert strip_final_eos(tok, [*answer, eos]) == answer
    assert strip_final_eos(tok, [*answer, eos, *newline]) == answer
    assert strip_final_eos(tok, [*answer, eos, *newline, eos]) == answer
    assert strip_final_eos(tok, [*answer, eos, *answer, eos]) == [*answer, eos, *answer]


@pytest.fixture
def strict_model(tmp_path: Path) -> Path:
    """The tiny model's config with a tokenizer that adds no BOS (as SmolLM2's and Qwen's) and a chat template that
    refuses system messages (as Gemma's and Mistral's raise_exception do)."""
    import shutil

    from fabric_align.args import EMBEDDED_MODEL
    from fabric_align.modeling import resolve_model_path

    model = tmp_path / "strict"
    shutil.copytree(resolve_model_path(EMBEDDED_MODEL), model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (model / "tokenizer.json").write_text(json.dumps(spec))
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (model / "chat_template.jinja").write_text(refuse + (model / "chat_template.jinja").read_text())
    return model


def test_an_empty_prompt_without_bos_conditions_on_an_end_token(tmp_path: Path, strict_model: Path) -> None:
    """An empty plain prompt would leave the first completion token nothing to be predicted from (and crashed the
    padding after the model loaded): it gets BOS, or the end-of-text token, as its context, and trains."""
    renderer = ChatRenderer(load_tokenizer(ModelArgs(name_or_path=str(strict_model))))
    assert renderer.tokenizer("hi")["input_ids"][0] != renderer.tokenizer.bos_token_id  # no BOS added
    assert renderer.encode("", "hi").prompt_ids == [renderer.tokenizer.bos_token_id]
    rows = [{"prompt": "" if i % 3 == 0 else f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(16)]
    args = [*FAST, f"--model.name_or_path={strict_model}", "--train.max_steps=2", "--data.val_path=null"]
    out = tmp_path / "out"
    run_cli(kto.setup, [*args, f"--data.train_path={write_jsonl(tmp_path / 'd.jsonl', rows)}", f"--out_dir={out}"])
    assert len(column(read_metrics(out), "train/loss")) == 2


def test_a_chat_template_that_refuses_a_conversation_names_the_row(tmp_path: Path, strict_model: Path) -> None:
    renderer = ChatRenderer(load_tokenizer(ModelArgs(name_or_path=str(strict_model))))
    ok = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    system = {"prompt": [{"role": "system", "content": "be brief"}, *ok["prompt"]], "completion": ok["completion"]}
    path = write_jsonl(tmp_path / "d.jsonl", [ok | {"label": True}, ok | {"label": False}, system | {"label": True}])
    with pytest.raises(DataError, match=r"d\.jsonl, line 3, field 'prompt': the chat template .* refuses this "):
        load_split(str(path), "train", renderer, 96, 0, train=True)


def test_columnar_nulls_are_absent_fields_and_suffixes_ignore_case(tmp_path: Path, renderer: ChatRenderer) -> None:
    """A parquet table gives every row every column: TRL and NeMo rows in one file load as they do from JSON lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "q0", "completion": "a0", "label": True},
        {"prompt": "q1", "response": "a1", "preference": "rejected"},
    ]
    columns = ["prompt", "completion", "label", "response", "preference"]
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), tmp_path / "mixed.parquet")
    lines = write_jsonl(tmp_path / "MIXED.JSONL", rows)
    from_table = load_split(str(tmp_path / "mixed.parquet"), "train", renderer, 96, 0, train=True)
    from_lines = load_split(str(lines), "train", renderer, 96, 0, train=True)
    assert from_table.labels.tolist() == from_lines.labels.tolist() == [True, False]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("one.json", '{\n  "prompt": "q", "completion": "a", "label": true\n}\n', "one JSON object (keys ["),
        ("big.jsonl", '{"prompt": "q", "completion": "a", "label": true, "n": ' + "9" * 5000 + "}\n", "line 1, field"),
        ("long.jsonl", json.dumps({"prompt": "q", "completion": "a", "label": "x" * 100_000}) + "\n", "characters)"),
        ("./missing/data.jsonl", None, "file not found"),
        ("./missing_dir", None, "no such file or directory"),
    ],
)
def test_unreadable_data_is_one_short_line(
    name: str, text: str | None, message: str, tmp_path: Path, renderer: ChatRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if text is not None:
        Path(name).write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        load_split(name, "train", renderer, 96, 0, train=True)
    assert len(str(caught.value)) < 300 and "\n" not in str(caught.value)


def test_a_single_row_is_a_split_only_without_a_kl_term(tmp_path: Path, renderer: ChatRenderer) -> None:
    path = str(write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "completion": "a", "label": True}]))
    with pytest.raises(DataError, match="1 usable row; the KL pairs need at least 2"):
        load_split(path, "train", renderer, 64, 0, train=False)
    data = load_split(path, "train", renderer, 64, 0, train=False, kl_pairs=False)  # apo_zero_unpaired
    assert len(data) == 1 and data.kl_sequences == []


def test_validating_on_the_training_data_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fabric_align.args import DataArgs
    from fabric_align.trainer import validation_source

    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        validation_source(DataArgs(train_path=str(path), val_path=str(tmp_path / "." / "rows.jsonl")))
        assert "data.val_path is the training data itself" in caplog.text
        caplog.clear()
        validation_source(DataArgs(train_path=str(path), val_path=str(tmp_path / "other.jsonl")))
        validation_source(DataArgs())  # the demo's own held-out split
    assert "training data itself" not in caplog.text
