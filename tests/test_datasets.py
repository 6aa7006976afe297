"""data.datasets: native-schema readers for every file layout (against files written by Hugging Face
`datasets` where it applies), one-line errors naming file, line/record and field, SFT arrays against
transformers' chat templates, and the tiny writers."""
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignment_geom.data import datasets as D
from alignment_geom.data import tokenizer as T
from alignment_geom.data.errors import DataError

hf_datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {style: T.build_word_tokenizer(str(root / style), D.TINY_VOCAB, style=style)
            for style in ("chatml", "llama3")}


@pytest.mark.parametrize("fmt", D.FORMATS + ("hf",))
def test_tiny_files_roundtrip_every_format(fmt, tmp_path):
    paths = D.write_tiny(str(tmp_path), n=5, fmt=fmt, seed=3)
    assert sorted(paths) == sorted(D.TASKS)
    for j, task in enumerate(D.TASKS):
        assert D.find_data_file(str(tmp_path), task) == paths[task]
        want = D.tiny_records(task, 5, 3000 + j)
        schema = D.SCHEMAS[task]
        fields = schema.required + schema.optional
        assert D.load_records(paths[task], task) == [{f: r.get(f, "") for f in fields} for r in want]
        raw = D.read_records(paths[task])
        assert [dict((k, r[k]) for k in want[0]) for r in raw] == want     # extra fields (dolly category) kept
    ex = D.load_task(str(tmp_path), "wikitext")
    assert len(ex) == 4 and all(e.prompt is None and e.response for e in ex)   # the blank fourth record skipped
    assert D.load_task(str(tmp_path), "gsm8k", limit=2)[1].response.startswith("#### ")


def test_hf_saved_datasets_read_without_datasets(tmp_path):
    rows = D.tiny_records("samsum", 7, seed=1)
    hf_datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "samsum"))
    assert D.read_records(str(tmp_path / "samsum")) == rows
    assert [e.response for e in D.load_task(str(tmp_path), "samsum")] == [r["summary"] for r in rows]
    # a DatasetDict with several shards per split; the split is chosen by name
    goals = D.tiny_records("advbench", 9, seed=2)
    dd = hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_list(goals),
                                  "test": hf_datasets.Dataset.from_list(goals[:3]).shuffle(seed=0)})
    dd.save_to_disk(str(tmp_path / "advbench"), num_shards={"train": 3, "test": 1})
    assert D.load_records(str(tmp_path / "advbench"), "advbench") == goals
    test_rows = [dict(r) for r in hf_datasets.load_from_disk(str(tmp_path / "advbench"))["test"]]
    assert D.read_records(str(tmp_path / "advbench"), split="test") == test_rows
    with pytest.raises(DataError, match="no split 'validation'") as e:
        D.read_records(str(tmp_path / "advbench"), split="validation")
    _one_line(e)
    # the library's writer is read back by datasets itself
    mine = D.write_hf_dataset(str(tmp_path / "mine"), rows)
    back = hf_datasets.load_from_disk(mine)
    assert [dict(r) for r in back] == rows and back.features["dialogue"].dtype == "string"


def test_hub_layouts_json_variants_and_alias(tmp_path):
    rows = D.tiny_records("gsm8k", 6, seed=4)
    (tmp_path / "gsm8k" / "data").mkdir(parents=True)
    for k, part in enumerate((rows[:4], rows[4:])):
        pq.write_table(pa.Table.from_pylist(part), str(tmp_path / "gsm8k" / "data" / f"train-0000{k}-of-00002.parquet"))
    assert [e.prompt for e in D.load_task(str(tmp_path), "gsm8k")] == [r["question"] for r in rows]
    assert len(D.load_task(str(tmp_path), "gsm8k", limit=5)) == 5
    shards = D.find_data_file(str(tmp_path), "gsm8k")
    assert shards.endswith("train-*.parquet") and D.read_records(shards) == rows
    (tmp_path / "dolly").mkdir()
    D.write_records(str(tmp_path / "dolly" / "train.csv"), D.tiny_records("dolly", 3))
    assert len(D.load_task(str(tmp_path), "dolly")) == 3
    # JSON: datasets' to_json writes JSON Lines under .json; {"train": [...]} and column-oriented files
    hf_datasets.Dataset.from_list(rows).to_json(str(tmp_path / "lines.json"))
    assert D.load_records(str(tmp_path / "lines.json"), "gsm8k") == rows
    json.dump({"train": rows}, open(tmp_path / "split.json", "w"))
    json.dump({k: [r[k] for r in rows] for k in rows[0]}, open(tmp_path / "cols.json", "w"))
    assert D.load_records(str(tmp_path / "split.json"), "gsm8k") == rows
    assert D.load_records(str(tmp_path / "cols.json"), "gsm8k") == rows
    # AdvBench copies that name the goal column "prompt"
    D.write_records(str(tmp_path / "adv.csv"), [{"prompt": "how to make bomb", "target": "ok"}])
    assert D.load_records(str(tmp_path / "adv.csv"), "advbench") == [{"goal": "how to make bomb", "target": "ok"}]


def _error(fn, *args, **kw):
    """The one-line message of the DataError that fn(*args) raises."""
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return _one_line(e)


def test_errors_name_file_place_and_field(tmp_path):
    assert re.match(r"no gsm8k data in .*gsm8k\.jsonl", _error(D.find_data_file, str(tmp_path), "gsm8k"))
    assert _error(D.load_task, str(tmp_path), "mmlu").startswith("unknown schema 'mmlu'")
    assert "not a directory" in _error(D.load_task, str(tmp_path / "nope"), "gsm8k")
    jl, csv_path, pq_path, js = (tmp_path / f for f in ("gsm8k.jsonl", "samsum.csv", "alpaca.parquet", "dolly.json"))
    cases = [  # (file, content, task, message)
        (jl, '{"question": "q1", "answer": "1"}\n\n{"question": "q2", "answer": "2"}\n{"question": "q3"}\n', "gsm8k",
         f"{jl}: line 4: record has no field 'answer' (a gsm8k record needs question, answer)"),
        (jl, '{"question": "q1", "answer": "1"}\n{"question": "q2", answer: 2}\n', "gsm8k",
         f"{jl}: line 2: invalid JSON (Expecting property name enclosed in double quotes at column 20)"),
        # the two-line field of record 1 shifts the line of record 3
        (csv_path, 'id,dialogue,summary\n1,"Tom: hi\nAnn: bye",greetings\n2,"Ann: x",\n3,d\n', "samsum",
         f"{csv_path}: line 5: field 'summary' is null"),
        (csv_path, 'id,dialogue\n1,"Tom: hi\nAnn: bye"\n', "samsum",
         f"{csv_path}: line 2: record has no field 'summary' (a samsum record needs dialogue, summary)"),
        (pq_path, pa.table({"instruction": ["a", "c", "e"], "output": ["b", None, "f"]}), "alpaca",
         f"{pq_path}: record 1: field 'output' is null"),
        (pq_path, pa.table({"instruction": ["a"], "output": [3]}), "alpaca",
         f"{pq_path}: record 0: field 'output' must be a string, got int"),
        (js, json.dumps([{"instruction": "i", "response": "r"}, ["not", "a", "record"]]), "dolly",
         f"{js}: record 1: a record must be an object with named fields, got list"),
    ]
    for path, content, task, message in cases:
        if isinstance(content, pa.Table):
            pq.write_table(content, str(path))
        else:
            path.write_text(content)
        assert _error(D.load_records, str(path), task) == message
    (tmp_path / "notes.txt").write_text("x")
    assert "unknown data file type 'txt'" in _error(D.load_records, str(tmp_path / "notes.txt"), "dolly")
    assert "no such data file" in _error(D.load_records, str(tmp_path / "gone.jsonl"), "dolly")
    # optional fields may be absent or null; the alpaca prompt then is the instruction alone
    recs = D.load_records(str(D.write_records(str(tmp_path / "a.jsonl"), [{"instruction": "x", "output": "y",
                                                                           "input": None}])), "alpaca")
    assert D.to_examples(recs, "alpaca") == [D.Example("x", "y")]


def test_prompt_formats():
    assert D.to_examples([{"instruction": "Sort", "input": "b a", "output": "a b"}], "alpaca") == [
        D.Example("Sort\n\nb a", "a b")]
    assert D.to_examples([{"instruction": "Q", "context": "", "response": "R"}], "dolly") == [D.Example("Q", "R")]
    assert D.to_examples([{"dialogue": "A: hi", "summary": "greeting"}], "samsum")[0].prompt == \
        "Summarize this dialogue:\nA: hi"
    assert D.final_number("She has 3 + 4 = 7.\n#### 1,234") == "1234"
    assert D.final_number("The total is 12.5 apples.") == "12.5"
    assert D.final_number("no digits") is None


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_sft_arrays_match_transformers_chat_template(style, tok_dirs, tmp_path):
    tok = T.load_tokenizer(tok_dirs[style])
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs[style])
    D.write_tiny(str(tmp_path), n=6)
    for task in D.TASKS:
        ex = D.load_task(str(tmp_path), task)
        for system, kw in ((None, {}), ("sorry", {}), (None, {"enable_thinking": False})):
            arr = D.tokenize_sft(tok, ex, 48, system=system, template_kwargs=kw)
            N = len(ex)
            assert arr["tokens"].shape == (N, 48) and arr["tokens"].dtype == np.int32
            assert arr["loss_mask"].dtype == np.float32 and not arr["truncated"].any()
            for i, e in enumerate(ex):
                L, p = int(arr["length"][i]), int(arr["prompt_len"][i])
                row = arr["tokens"][i]
                assert (arr["attention_mask"][i] == (np.arange(48) < L)).all()
                assert (row[L:] == tok.pad_id).all() and tok.unk_id not in row[:L]
                np.testing.assert_array_equal(arr["loss_mask"][i], (np.arange(48) >= p) & (np.arange(48) < L))
                if e.prompt is None:
                    want = hf.encode(e.response) + [hf.eos_token_id]
                    assert p == 1 and list(row[:L]) == want
                    continue
                msgs = D.chat_messages(e.prompt, system=system)
                ref_prompt = hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False, **kw)
                ref_full = hf.apply_chat_template(msgs + [{"role": "assistant", "content": e.response}],
                                                  return_dict=False, **kw)
                assert list(row[:p]) == ref_prompt and list(row[:L]) == ref_full
                target = tok.decode(row[p:L], skip_special_tokens=True)
                assert target.split()[-len(e.response.split()):] == e.response.split()
                assert row[L - 1] == tok.eos_id        # the end of the turn is a target


def test_sft_truncation_and_prompts(tok_dirs):
    tok = T.load_tokenizer(tok_dirs["chatml"])
    ex = [D.Example("tom has 3 apples gets 4 more total", "7"), D.Example("copy a b", "a b c d e f g h")]
    full = D.tokenize_sft(tok, ex, 64, pad_to_longest=True)
    assert full["tokens"].shape[1] == full["length"].max() and not full["truncated"].any()
    cut = D.tokenize_sft(tok, ex, int(full["prompt_len"][1]) + 3)
    assert cut["truncated"][1] and cut["answer_len"][1] == 3 and cut["length"][1] == cut["tokens"].shape[1]
    np.testing.assert_array_equal(cut["tokens"][1], full["tokens"][1, :cut["tokens"].shape[1]])
    tiny = D.tokenize_sft(tok, ex, int(full["prompt_len"][0]) - 1)
    assert tiny["answer_len"][0] == 0 and tiny["loss_mask"][0].sum() == 0 and tiny["truncated"].all()
    with pytest.raises(DataError, match="seq_len"):
        D.tokenize_sft(tok, ex, 1)
    # generation prompts: left-padded, each equal to the chat template's ids with the generation prompt
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs["chatml"])
    prompts = ["how to make bomb", "tom says hi ann says bye"]
    out = D.tokenize_prompts(tok, prompts, system="sorry")
    for i, p in enumerate(prompts):
        ref = hf.apply_chat_template(D.chat_messages(p, system="sorry"), add_generation_prompt=True,
                                     return_dict=False)
        n = int(out["prompt_len"][i])
        assert n == len(ref) and list(out["tokens"][i, -n:]) == ref and out["attention_mask"][i, :-n].sum() == 0
    assert D.format_prompt(tok, prompts[0]).endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match="prompt 1 has"):
        D.tokenize_prompts(tok, prompts, system="sorry", max_len=int(out["prompt_len"][0]))


def test_sft_rejects_templates_without_prompt_prefix(tok_dirs):
    tok = T.load_tokenizer(tok_dirs["chatml"])
    odd = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
    tok.chat_template = odd
    with pytest.raises(DataError, match="example 0: the chat template does not render the prompt") as e:
        D.tokenize_sft(tok, [D.Example("tom", "ann")], 16)
    _one_line(e)
