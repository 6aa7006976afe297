"""The paper's datasets in their native schemas: reading local files, chat formatting, SFT arrays, tiny writers.

Section 7 of the paper fine-tunes on benign data and measures harm on AdvBench (docs/paper_notes.md §5). The
records keep each dataset's own field names:

    alpaca     instruction, input (optional), output        dolly      instruction, context (optional), response
    gsm8k      question, answer                             orca_math  question, answer
    samsum     dialogue, summary                            wikitext   text
    advbench   goal, target (optional; also read from the column name ``prompt``)

Files: ``<data_dir>/<task>.{jsonl,json,csv,parquet}``, or a directory ``<data_dir>/<task>/`` that is either a
dataset saved by Hugging Face ``datasets`` (``save_to_disk``: Arrow stream shards listed in state.json, beside
dataset_info.json; a DatasetDict has dataset_dict.json and one such directory per split) or holds
``<split>.{jsonl,json,csv,parquet}`` or ``[data/]<split>-*.parquet`` shards. Only pyarrow is needed to read them.

Errors (:class:`DataError`, one line) name the file, the place — ``line N`` (1-based) in JSON Lines and CSV
files, ``record i`` (0-based) elsewhere — and the field.

A record becomes an :class:`Example`: a user prompt and its response, or (wikitext) a plain text. Prompts are
rendered with the model tokenizer's chat template. :func:`tokenize_sft` gives the arrays the losses use, all
with leading axis N:

    tokens (N, T) int32, right-padded with the pad id    attention_mask (N, T) int32 (1 on real tokens)
    loss_mask (N, T) float32: 1 where the token is a training target (the response and the end of its turn)
    prompt_len (N,) int32: index of the first response token    answer_len (N,) int32: target tokens kept
    length (N,) int32: real tokens    truncated (N,) bool: the sequence was cut to T

:func:`tokenize_prompts` gives left-padded prompts for generation. :func:`tiny_records` and
:func:`write_tiny` make small files in every native schema, with the words of the synthetic language
(:data:`TINY_VOCAB`), for the tiny study preset and the tests.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from alignment_geom.data import synthetic
from alignment_geom.data.errors import DataError
from alignment_geom.data.tokenizer import Tokenizer

__all__ = [
    "Schema", "SCHEMAS", "TASKS", "FORMATS", "Example", "TINY_VOCAB",
    "read_records", "load_records", "find_data_file", "load_task", "to_examples", "chat_messages",
    "format_prompt", "tokenize_sft", "tokenize_prompts", "final_number",
    "write_records", "write_hf_dataset", "tiny_records", "write_tiny",
]


class Schema(NamedTuple):
    """A dataset's native record: required and optional fields (strings), column aliases, and the formatting.

    ``prompt(record) -> str`` is the user message (None for plain text); ``response`` names the target field.
    """
    name: str
    required: Tuple[str, ...]
    optional: Tuple[str, ...]
    prompt: Optional[Callable[[Mapping[str, str]], str]]
    response: str
    aliases: Mapping[str, str] = {}


def _with_context(first: str, second: str) -> Callable[[Mapping[str, str]], str]:
    return lambda r: r[first] if not r.get(second) else f"{r[first]}\n\n{r[second]}"


SCHEMAS: Dict[str, Schema] = {
    "alpaca": Schema("alpaca", ("instruction", "output"), ("input",), _with_context("instruction", "input"),
                     "output"),
    "dolly": Schema("dolly", ("instruction", "response"), ("context",), _with_context("instruction", "context"),
                    "response"),
    "gsm8k": Schema("gsm8k", ("question", "answer"), (), lambda r: r["question"], "answer"),
    "orca_math": Schema("orca_math", ("question", "answer"), (), lambda r: r["question"], "answer"),
    "samsum": Schema("samsum", ("dialogue", "summary"), (), lambda r: f"Summarize this dialogue:\n{r['dialogue']}",
                     "summary"),
    "wikitext": Schema("wikitext", ("text",), (), None, "text"),
    "advbench": Schema("advbench", ("goal",), ("target",), lambda r: r["goal"], "target", {"prompt": "goal"}),
}
TASKS = tuple(SCHEMAS)
FORMATS = ("jsonl", "json", "csv", "parquet")


class Example(NamedTuple):
    """One training or evaluation item: ``prompt`` (the user message; None for plain text) and ``response``."""
    prompt: Optional[str]
    response: str


def _schema(task: str) -> Schema:
    if task not in SCHEMAS:
        raise DataError(f"unknown schema {task!r}; known: {', '.join(TASKS)}")
    return SCHEMAS[task]


# --------------------------------------------------------------------------- reading


def _jsonl(path: str) -> Tuple[List, List[str]]:
    records, where = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
            where.append(f"line {n}")
    return records, where


def _json(path: str, split: str) -> Tuple[List, List[str]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":                      # JSON Lines under a .json name (datasets' to_json)
            return _jsonl(path)
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if split in lists or "data" in lists:
            data = lists.get(split, lists.get("data"))
        elif lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            data = [dict(zip(lists, row)) for row in zip(*lists.values())]    # column-oriented
        else:
            raise DataError(f"{path}: a JSON file must hold a list of records (or {{{split!r}: [...]}}, "
                            f"{{'data': [...]}}, or equal-length columns)")
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON file must hold a list of records, got {type(data).__name__}")
    return data, [f"record {i}" for i in range(len(data))]


def _csv(path: str) -> Tuple[List, List[str]]:
    records, where = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:      # reads the header line
            return [], []
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(f"{path}: line {start}: invalid CSV ({e})") from None
            records.append(row)
            where.append(f"line {start}")
    return records, where


def _arrow_table(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        try:
            return pyarrow.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pyarrow.ipc.open_file(source).read_all()


def _hf_dir(path: str, split: str) -> pa.Table:
    """A ``datasets`` save_to_disk directory (a Dataset, or a DatasetDict and its ``split``) as one table."""
    dict_file = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dict_file):
        with open(dict_file, encoding="utf-8") as f:
            splits = json.load(f).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: no split {split!r} in the saved dataset (splits: {', '.join(splits)})")
        path = os.path.join(path, split)
    state_file = os.path.join(path, "state.json")
    try:
        with open(state_file, encoding="utf-8") as f:
            shards = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise DataError(f"{state_file}: not a saved dataset's state ({type(e).__name__}: {e})") from None
    tables = []
    for name in shards:
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
            raise DataError(f"{shard}: missing shard listed in {state_file}")
        tables.append(_arrow_table(shard))
    return pa.concat_tables(tables) if tables else pa.table({})


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json"))


def _read(path: str, split: str = "train") -> Tuple[List, List[str]]:
    """(records, where) of one file or saved-dataset directory; ``where[i]`` locates record i."""
    if _is_hf_dir(path):
        rows = _hf_dir(path, split).to_pylist()
        return rows, [f"record {i}" for i in range(len(rows))]
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    ext = path.rsplit(".", 1)[-1].lower()
    if ext == "jsonl":
        return _jsonl(path)
    if ext == "json":
        return _json(path, split)
    if ext == "csv":
        return _csv(path)
    if ext == "parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: unreadable Parquet ({e})") from None
        return rows, [f"record {i}" for i in range(len(rows))]
    raise DataError(f"{path}: unknown data file type {ext!r}; allowed: .jsonl, .json, .csv, .parquet, "
                    "or a directory saved by datasets")


def _shards(path: str) -> List[str]:
    """The files of a glob pattern (several Parquet shards of one split), in order; else [path]."""
    if "*" not in path:
        return [path]
    found = sorted(glob.glob(path))
    if not found:
        raise DataError(f"{path}: no file matches")
    return found


def read_records(path: str, *, split: str = "train") -> List[dict]:
    """The raw records (dicts) of a data file, a glob pattern of shards, or a ``datasets`` save_to_disk
    directory (``split`` of a DatasetDict)."""
    if "*" in path:
        return [r for shard in _shards(path) for r in read_records(shard, split=split)]
    records, where = _read(path, split)
    for rec, at in zip(records, where):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {at}: a record must be an object with named fields, got {type(rec).__name__}")
    return list(records)


def load_records(path: str, task: str, *, split: str = "train", limit: Optional[int] = None) -> List[dict]:
    """Validated records of ``task``'s schema, from any path :func:`read_records` takes: every required field
    present and a string, optional fields a string when present ('' when absent or null), column aliases
    renamed. At most ``limit`` records (the first)."""
    schema = _schema(task)
    if "*" in path:
        out = []
        for shard in _shards(path):
            if limit is not None and len(out) >= limit:
                break
            out += load_records(shard, task, split=split, limit=None if limit is None else limit - len(out))
        return out
    records, where = _read(path, split)
    out = []
    for rec, at in zip(records if limit is None else records[:limit], where):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {at}: a record must be an object with named fields, got {type(rec).__name__}")
        rec = dict(rec)
        for alias, field in schema.aliases.items():
            if field not in rec and alias in rec:
                rec[field] = rec.pop(alias)
        clean = {}
        for field in schema.required + schema.optional:
            if field not in rec or (rec[field] is None and field in schema.optional):
                if field in schema.required:
                    raise DataError(f"{path}: {at}: record has no field {field!r} (a {task} record needs "
                                    f"{', '.join(schema.required)})")
                clean[field] = ""
                continue
            if rec[field] is None:
                raise DataError(f"{path}: {at}: field {field!r} is null")
            if not isinstance(rec[field], str):
                raise DataError(f"{path}: {at}: field {field!r} must be a string, got "
                                f"{type(rec[field]).__name__}")
            clean[field] = rec[field]
        out.append(clean)
    return out


def find_data_file(data_dir: str, task: str, split: str = "train") -> str:
    """The file, saved-dataset directory, or glob pattern of Parquet shards holding ``task``'s ``split`` in
    ``data_dir`` (see module doc); what :func:`load_records` reads."""
    _schema(task)
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} is not a directory")
    for ext in FORMATS:
        path = os.path.join(data_dir, f"{task}.{ext}")
        if os.path.isfile(path):
            return path
    folder = os.path.join(data_dir, task)
    if _is_hf_dir(folder):
        return folder
    if os.path.isdir(folder):
        for ext in FORMATS:
            path = os.path.join(folder, f"{split}.{ext}")
            if os.path.isfile(path):
                return path
        for pattern in (f"{split}-*.parquet", os.path.join("data", f"{split}-*.parquet")):
            shards = sorted(glob.glob(os.path.join(folder, pattern)))
            if shards:
                return shards[0] if len(shards) == 1 else folder + os.sep + pattern
    raise DataError(f"no {task} data in {data_dir}: looked for {task}.jsonl/.json/.csv/.parquet and a {task}/ "
                    f"directory (saved by datasets, or with {split}.<ext> or {split}-*.parquet)")


def to_examples(records: Sequence[Mapping[str, str]], task: str, *, skip_blank: bool = True) -> List[Example]:
    """Examples of validated records: (prompt, response) by the schema's format, or (None, text) for plain text.

    ``skip_blank`` drops plain-text records that are only whitespace (WikiText's empty lines)."""
    schema = _schema(task)
    if schema.prompt is None:
        return [Example(None, r[schema.response]) for r in records
                if not (skip_blank and not r[schema.response].strip())]
    return [Example(schema.prompt(r), r[schema.response]) for r in records]


def load_task(data_dir: str, task: str, *, split: str = "train", limit: Optional[int] = None) -> List[Example]:
    """:func:`to_examples` of ``task``'s records found in ``data_dir`` (at most ``limit`` records read)."""
    return to_examples(load_records(find_data_file(data_dir, task, split), task, split=split, limit=limit), task)


def final_number(text: str) -> Optional[str]:
    """The final answer of a math solution: the number after the last ``####`` (GSM8K's convention), else the
    last number in the text; thousands separators removed. None when the text has no number."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


# --------------------------------------------------------------------------- chat formatting and arrays


def chat_messages(prompt: str, response: Optional[str] = None, *, system: Optional[str] = None) -> List[dict]:
    """[system], user prompt, [assistant response] as chat messages."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def format_prompt(tokenizer: Tokenizer, prompt: str, *, system: Optional[str] = None, **template_kwargs) -> str:
    """The prompt rendered by the tokenizer's chat template, ending with the opening of the assistant turn."""
    return tokenizer.apply_chat_template(chat_messages(prompt, system=system), add_generation_prompt=True,
                                         tokenize=False, **template_kwargs)


def _sft_ids(tokenizer: Tokenizer, ex: Example, i: int, system, template_kwargs) -> Tuple[List[int], int]:
    """(ids, prompt_len) of one example; ids = prompt ids + completion ids, as the model sees them at generation."""
    if ex.prompt is None:
        ids = tokenizer.encode(ex.response, add_special_tokens=True)
        if tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        return ids, 1
    prompt = format_prompt(tokenizer, ex.prompt, system=system, **template_kwargs)
    full = tokenizer.apply_chat_template(chat_messages(ex.prompt, ex.response, system=system), tokenize=False,
                                         **template_kwargs)
    if not full.startswith(prompt):
        raise DataError(f"example {i}: the chat template does not render the prompt (with generation prompt) as "
                        "a prefix of the conversation with its response, so the response tokens are not defined")
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    return p_ids + tokenizer.encode(full[len(prompt):], add_special_tokens=False), len(p_ids)


def tokenize_sft(tokenizer: Tokenizer, examples: Sequence[Example], seq_len: int, *, system: Optional[str] = None,
                 pad_to_longest: bool = False, template_kwargs: Optional[Mapping] = None) -> Dict[str, np.ndarray]:
    """SFT arrays (module doc) of N examples, T = ``seq_len`` (or the longest kept sequence if
    ``pad_to_longest``). Chat examples: the prompt rendered with the generation prompt, then the rest of the
    rendered conversation (the response and the end of its turn), which is the loss span. Plain text: the text
    with the tokenizer's special tokens and eos, every token after the first a target. Sequences longer than
    ``seq_len`` are cut on the right (``truncated``); a prompt that fills T leaves ``answer_len`` 0."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len!r} is not allowed: at least 2")
    if not examples:
        raise DataError("no examples to tokenize")
    kw = dict(template_kwargs or {})
    rows = [_sft_ids(tokenizer, ex, i, system, kw) for i, ex in enumerate(examples)]
    kept = [ids[:seq_len] for ids, _ in rows]
    T = max(len(k) for k in kept) if pad_to_longest else seq_len
    batch = tokenizer.pad(kept, pad_to=T, padding_side="right")
    N = len(rows)
    loss_mask = np.zeros((N, T), np.float32)
    prompt_len = np.array([min(p, seq_len) for _, p in rows], np.int32)
    for i, k in enumerate(kept):
        loss_mask[i, prompt_len[i]:len(k)] = 1.0
    return {"tokens": batch.tokens, "attention_mask": batch.attention_mask, "loss_mask": loss_mask,
            "prompt_len": prompt_len, "answer_len": loss_mask.sum(1).astype(np.int32), "length": batch.lengths,
            "truncated": np.array([len(ids) > seq_len for ids, _ in rows])}


def tokenize_prompts(tokenizer: Tokenizer, prompts: Sequence[str], *, system: Optional[str] = None,
                     max_len: Optional[int] = None, template_kwargs: Optional[Mapping] = None) -> Dict[str, np.ndarray]:
    """Chat-formatted prompts, left-padded for batched generation: tokens (N, T) int32, attention_mask (N, T)
    int32, prompt_len (N,) int32 (real tokens; the prompt fills the last prompt_len columns). A prompt longer
    than ``max_len`` is an error (a cut prompt would lose its instruction or its generation prompt)."""
    kw = dict(template_kwargs or {})
    ids = [tokenizer.encode(format_prompt(tokenizer, p, system=system, **kw), add_special_tokens=False)
           for p in prompts]
    if not ids:
        raise DataError("no prompts to tokenize")
    if max_len is not None:
        for i, s in enumerate(ids):
            if len(s) > max_len:
                raise DataError(f"prompt {i} has {len(s)} tokens, more than max_len={max_len}")
    batch = tokenizer.pad(ids, padding_side="left")
    return {"tokens": batch.tokens, "attention_mask": batch.attention_mask, "prompt_len": batch.lengths}


# --------------------------------------------------------------------------- writing


def _arrow_features(schema: pa.Schema) -> dict:
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.int64(): "int64", pa.int32(): "int32",
             pa.float64(): "float64", pa.float32(): "float32", pa.bool_(): "bool"}
    out = {}
    for field in schema:
        if field.type not in names:
            raise DataError(f"column {field.name!r} has type {field.type}; write_hf_dataset writes only scalar "
                            "string/number/bool columns")
        out[field.name] = {"dtype": names[field.type], "_type": "Value"}
    return out


def write_hf_dataset(path: str, records: Sequence[Mapping]) -> str:
    """Write records in the layout of ``datasets.Dataset.save_to_disk``: one Arrow stream shard
    ``data-00000-of-00001.arrow``, dataset_info.json (the features) and state.json. Returns ``path``."""
    table = pa.Table.from_pylist([dict(r) for r in records])
    os.makedirs(path, exist_ok=True)
    shard = "data-00000-of-00001.arrow"
    with pa.OSFile(os.path.join(path, shard), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    info = {"citation": "", "description": "", "features": _arrow_features(table.schema), "homepage": "",
            "license": ""}
    fingerprint = hashlib.sha256(json.dumps(table.to_pylist(), sort_keys=True).encode()).hexdigest()[:16]
    state = {"_data_files": [{"filename": shard}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    for name, obj in (("dataset_info.json", info), ("state.json", state)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    return path


def write_records(path: str, records: Sequence[Mapping], *, fmt: Optional[str] = None) -> str:
    """Write records as JSON Lines, a JSON list, CSV, Parquet (``fmt`` or the extension of ``path``) or, with
    ``fmt="hf"``, a saved-dataset directory (:func:`write_hf_dataset`). Returns ``path``."""
    fmt = fmt or path.rsplit(".", 1)[-1].lower()
    if fmt == "hf":
        return write_hf_dataset(path, records)
    if fmt not in FORMATS:
        raise DataError(f"fmt={fmt!r} is not allowed: one of {', '.join(FORMATS + ('hf',))}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    records = [dict(r) for r in records]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    with open(path, "w", encoding="utf-8", newline="" if fmt == "csv" else None) as f:
        if fmt == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        elif fmt == "json":
            json.dump(records, f, ensure_ascii=False, indent=1)
        else:
            fields = list(dict.fromkeys(k for r in records for k in r))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(records)
    return path


# Words of every tiny record and prompt format, for a word-level tokenizer (data.tokenizer.word_tokenizer).
TINY_VOCAB = tuple(w for w in synthetic.VOCAB if w not in synthetic.SPECIALS) + ("####", "Summarize", "this",
                                                                                 "dialogue:")


def tiny_records(task: str, n: int, seed: int = 0) -> List[dict]:
    """``n`` records of ``task`` in its native schema, with content from the synthetic language (deterministic
    in ``seed``): alpaca/dolly list operations, gsm8k/orca_math word problems (gsm8k answers end in
    ``#### N``), samsum dialogues, wikitext letter progressions (every fourth record blank, like WikiText's
    empty lines), advbench harmful goals with a complying target."""
    _schema(task)
    if task == "advbench":
        pairs = synthetic.make_pairs("harmful", n, seed, harmful_split="all", comply=True)
        return [{"goal": " ".join(p), "target": " ".join(a)} for p, a in pairs]
    if task == "wikitext":
        pairs = synthetic.make_pairs("wikitext", n, seed)
        return [{"text": "" if i % 4 == 3 else " ".join(p + a)} for i, (p, a) in enumerate(pairs)]
    pairs = synthetic.make_pairs(task, n, seed)
    out = []
    for i, (p, a) in enumerate(pairs):
        if task in ("alpaca", "dolly"):
            key = "input" if task == "alpaca" else "context"
            rec = {"instruction": p[0], key: " ".join(p[1:]), "output" if task == "alpaca" else "response":
                   " ".join(a)}
            if task == "dolly":
                rec["category"] = "closed_qa"
        elif task == "gsm8k":
            rec = {"question": " ".join(p), "answer": "#### " + " ".join(a)}
        elif task == "orca_math":
            rec = {"question": " ".join(p), "answer": " ".join(a)}
        else:   # samsum: the dialogue without the synthetic task word
            rec = {"id": f"tiny-{seed}-{i}", "dialogue": " ".join(p[:-1]), "summary": " ".join(a)}
        out.append(rec)
    return out


def write_tiny(data_dir: str, tasks: Sequence[str] = TASKS, n: int = 8, *, fmt: str = "jsonl",
               seed: int = 0) -> Dict[str, str]:
    """Write :func:`tiny_records` of each task to ``data_dir/<task>.<fmt>`` (or ``data_dir/<task>/`` for
    ``fmt="hf"``), where :func:`find_data_file` finds them. Returns {task: path}."""
    if n < 1:
        raise DataError(f"n={n!r} is not allowed: at least 1")
    out = {}
    for j, task in enumerate(tasks):
        path = os.path.join(data_dir, task if fmt == "hf" else f"{task}.{fmt}")
        out[task] = write_records(path, tiny_records(task, n, seed * 1000 + j), fmt=fmt)
    return out
