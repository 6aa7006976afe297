"""Data for the Section-7 studies: tokenizers and chat templates, the paper's datasets, harmfulness judges, and the
synthetic instruction language (with its programmatic judge).

    tokenizer   Hugging Face tokenizer directories (tokenizer.json + chat templates) without transformers;
                word-level tokenizers with a ChatML or Llama-3 template, written as such directories
    datasets    Alpaca, Dolly, GSM8K, Orca-Math, SamSum, WikiText, AdvBench in their native schemas, read from
                local files; chat-formatted SFT arrays and generation prompts; tiny writers
    judges      keyword refusal judge (ASR) and the 1–5 harmfulness rubric through an OpenAI-compatible
                endpoint or a local model, with a per-item cache
    selection   gradient-similarity selection (the Alpaca top-100 subset: benign examples whose gradients align
                with harmful compliance)
    synthetic   a closed-vocabulary instruction language with harmful and benign tasks, generated from a seed
    errors      DataError, JudgeError, JudgeUnreachable (one-line, ValueError subclasses)
"""
from alignment_geom.data import datasets, judges, selection, synthetic, tokenizer
from alignment_geom.data.datasets import (
    TASKS,
    Example,
    find_data_file,
    load_records,
    load_task,
    tokenize_prompts,
    tokenize_sft,
    write_tiny,
)
from alignment_geom.data.errors import DataError, JudgeError, JudgeUnreachable
from alignment_geom.data.judges import LocalJudge, OpenAIJudge, attack_success_rate, keyword_harmful
from alignment_geom.data.selection import gradient_similarity, mean_gradient, top_similar
from alignment_geom.data.tokenizer import Tokenizer, build_word_tokenizer, load_tokenizer, word_tokenizer

__all__ = [
    "datasets", "judges", "selection", "synthetic", "tokenizer",
    "gradient_similarity", "mean_gradient", "top_similar",
    "DataError", "JudgeError", "JudgeUnreachable",
    "Tokenizer", "load_tokenizer", "word_tokenizer", "build_word_tokenizer",
    "TASKS", "Example", "find_data_file", "load_records", "load_task", "tokenize_sft", "tokenize_prompts",
    "write_tiny",
    "OpenAIJudge", "LocalJudge", "keyword_harmful", "attack_success_rate",
]
