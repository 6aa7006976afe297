"""data.tokenizer against transformers on tiny tokenizers the tests build: chat-template text and ids
(ChatML/Qwen3-style with <think> handling, Llama-3-style), encode/pad/decode, the directory layouts, and the
word-level tokenizers of the toy language."""
import json
import os

import jinja2
import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from alignment_geom.data import tokenizer as T

transformers = pytest.importorskip("transformers")

CORPUS = ["Hello world, how are you today?", "The quick brown fox jumps over the lazy dog.",
          "Summarize the dialogue: Tom says hi. Ann says bye.", "What is 12 + 30? The answer is 42.",
          "I'm sorry, but I cannot help with that.", "Sure, here is a plan: step one, step two."] * 4

# A Llama-3.1-style template written for these tests: the date header (strftime_now or date_string), tools
# through tojson(indent=4), raise_exception on a misplaced role, and loop controls.
LLAMA31_STYLE = """\
{{- bos_token }}
{%- if date_string is not defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}
{%- if messages[0].role == 'system' %}
{%- set system = messages[0].content | trim %}{%- set rest = messages[1:] %}
{%- else %}
{%- set system = '' %}{%- set rest = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}
{%- if tools is not none %}
{{- 'You may call these functions:\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
{%- endif %}
{{- system + '<|eot_id|>' }}
{%- for m in rest %}
{%- if m.role == 'system' %}{{- raise_exception('the system message must come first') }}{%- endif %}
{%- if m.content is not string %}{%- continue %}{%- endif %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers <a> & <b>",
                                         "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}

CHATS = [
    [{"role": "user", "content": "Hello world"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."},
     {"role": "user", "content": "Summarize the dialogue: Tom says hi."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>\nThe user greets.\n</think>\n\nHello!"},
     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "<think>short</think>Bye!"}],
    [{"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "two plus two", "tool_calls": None}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4", "reasoning": "easy"}],
]


def _bpe(specials, plain_added=(), bos=None):
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if plain_added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen_tok"))
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain_added=("<think>", "</think>"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>", chat_template=T.CHATML_TEMPLATE)
    hf.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}, f)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_tok"))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _bpe(specials, bos="<|begin_of_text|>")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                              eos_token="<|eot_id|>", chat_template=LLAMA31_STYLE,
                                              clean_up_tokenization_spaces=True)
    hf.save_pretrained(path)
    return path


def _pair(path):
    return T.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def _ref(hf, chat, **kw):
    return hf.apply_chat_template(chat, return_dict=False, **kw)


@pytest.mark.parametrize("gen", [False, True])
def test_chatml_matches_transformers(qwen_dir, gen):
    ours, hf = _pair(qwen_dir)
    for chat in CHATS:
        for extra in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False, **extra)
            assert text == _ref(hf, chat, add_generation_prompt=gen, tokenize=False, **extra)
            ids = ours.apply_chat_template(chat, add_generation_prompt=gen, **extra)
            assert ids == _ref(hf, chat, add_generation_prompt=gen, **extra)
    # tools through tojson (no HTML escaping), and a batch of conversations
    kw = dict(tools=[TOOL], add_generation_prompt=gen)
    assert ours.apply_chat_template(CHATS[1], tokenize=False, **kw) == _ref(hf, CHATS[1], tokenize=False, **kw)
    assert "<a> & <b>" in ours.apply_chat_template(CHATS[1], tokenize=False, **kw)
    assert ours.apply_chat_template(CHATS[:3], **kw) == _ref(hf, CHATS[:3], **kw)


def test_chatml_think_handling(qwen_dir):
    ours, _ = _pair(qwen_dir)
    text = ours.apply_chat_template(CHATS[3], tokenize=False)
    # the think block of the earlier assistant turn (before the last user query) is dropped, the last one kept
    assert "The user greets" not in text and "Hello!" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nshort\n</think>\n\nBye!<|im_end|>\n")
    # reasoning given as a message field (either name) renders like inline <think>
    assert ("<think>\ntwo plus two\n</think>\n\n4" in ours.apply_chat_template(CHATS[4], tokenize=False))
    assert "<think>\neasy\n</think>\n\n4" in ours.apply_chat_template(CHATS[5], tokenize=False)
    off = ours.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think = ours.token_to_id("<think>")
    assert think in ours.apply_chat_template(CHATS[3])   # an added (non-special) token, encoded as one id


def test_llama_matches_transformers(llama_dir):
    ours, hf = _pair(llama_dir)
    for chat in CHATS[:3] + [CHATS[5]]:
        for gen in (False, True):
            for extra in ({}, {"date_string": "26 Jul 2024"}):
                kw = dict(add_generation_prompt=gen, **extra)
                assert ours.apply_chat_template(chat, tokenize=False, **kw) == _ref(hf, chat, tokenize=False, **kw)
                assert ours.apply_chat_template(chat, **kw) == _ref(hf, chat, **kw)
    kw = dict(tools=[TOOL], add_generation_prompt=True, date_string="1 Jan 2025")
    assert ours.apply_chat_template(CHATS[1], **kw) == _ref(hf, CHATS[1], **kw)
    ids = ours.apply_chat_template(CHATS[0])
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1       # the template writes bos, encode does not
    # the short Llama-3 template of the library, and continue_final_message (a prefill left open)
    chat = CHATS[2] + [{"role": "assistant", "content": "Tom says"}]
    for kw in ({"add_generation_prompt": True}, {"continue_final_message": True}):
        ref = _ref(hf, chat, chat_template=T.LLAMA3_TEMPLATE, **kw)
        assert ours.apply_chat_template(chat, chat_template=T.LLAMA3_TEMPLATE, **kw) == ref
    assert ours.apply_chat_template(chat, chat_template=T.LLAMA3_TEMPLATE, continue_final_message=True,
                                    tokenize=False).endswith("<|end_header_id|>\n\nTom says")


def test_template_errors_and_sandbox(llama_dir, qwen_dir):
    ours, hf = _pair(llama_dir)
    bad = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    for tok in (ours, hf):
        with pytest.raises(jinja2.exceptions.TemplateError, match="system message must come first"):
            tok.apply_chat_template(bad)
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHATS[0], chat_template=escape, tokenize=False)
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHATS[0], chat_template="{% set ns = namespace(_x=1) %}", tokenize=False)
    mutate = "{{ messages.append(1) }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHATS[0], chat_template=mutate, tokenize=False)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="exclude each other"):
        ours.apply_chat_template(CHATS[0], add_generation_prompt=True, continue_final_message=True)
    tpl = "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ dict(a=1) | tojson }}{% generation %}g" \
          "{% endgeneration %}"
    q, qhf = _pair(qwen_dir)
    assert q.apply_chat_template(CHATS[0], chat_template=tpl, tokenize=False) == \
        _ref(qhf, CHATS[0], chat_template=tpl, tokenize=False) == "|<|im_end|>|True|{\"a\": 1}g"
    # block whitespace: trim_blocks and lstrip_blocks; keys whose value is None are dropped
    layout = ("{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% else %}\n"
              "A: {{ m.content }} {{ m.extra is defined }}\n    {% endif %}\n{% endfor %}")
    chat = [CHATS[2][0], {**CHATS[2][1], "extra": None}]
    assert q.apply_chat_template(chat, chat_template=layout, tokenize=False) == \
        _ref(qhf, chat, chat_template=layout, tokenize=False) == "U: How are you?\nA: Fine, thanks. False\n"


TEXTS = ["Hello world, how are you?", "I'm sorry , but I cannot ! it 's", "", "The quick brown fox jumps."]


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_encode_pad_decode_match_transformers(which, qwen_dir, llama_dir):
    ours, hf = _pair(qwen_dir if which == "qwen" else llama_dir)
    assert ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for special in (True, False):
        for text in TEXTS:
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
    for side in ("left", "right"):
        for max_length in (None, 5):
            kw = dict(padding=True, padding_side=side) if max_length is None else dict(
                padding="max_length", padding_side=side, truncation=True, max_length=max_length)
            ref = hf(TEXTS, return_tensors="np", **kw) if hf.pad_token_id is not None else None
            got = ours.encode_batch(TEXTS, padding_side=side, max_length=max_length, pad_to=max_length)
            lengths = [min(len(hf.encode(t)), max_length or 10**9) for t in TEXTS]
            np.testing.assert_array_equal(got.lengths, lengths)
            np.testing.assert_array_equal(got.attention_mask.sum(1), lengths)
            if ref is not None:
                np.testing.assert_array_equal(got.tokens, ref["input_ids"])
                np.testing.assert_array_equal(got.attention_mask, ref["attention_mask"])
            else:   # no pad token: padding is the eos id, the real tokens are transformers' ids
                assert ours.pad_id == ours.eos_id
                for row, m, t in zip(got.tokens, got.attention_mask, TEXTS):
                    assert list(row[m == 1]) == hf.encode(t)[:max_length]
    ids = ours.apply_chat_template(CHATS[2], add_generation_prompt=True)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.batch_decode([ids, ids[:3]], skip_special_tokens=skip) == hf.batch_decode(
            [ids, ids[:3]], skip_special_tokens=skip)


def test_pad_and_truncation_sides():
    tok = T.word_tokenizer(["a", "b", "c", "d"])
    ids = [[10, 11, 12], [13]]
    b = tok.pad(ids, max_length=2, truncation_side="left", padding_side="left", pad_to=4)
    np.testing.assert_array_equal(b.tokens, [[0, 0, 11, 12], [0, 0, 0, 13]])
    np.testing.assert_array_equal(b.attention_mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="pad_to"):
        tok.pad(ids, pad_to=2)
    with pytest.raises(ValueError, match="padding_side"):
        tok.pad(ids, padding_side="middle")


def test_layouts_legacy_config_and_named_templates(qwen_dir, tmp_path):
    """chat_template inside tokenizer_config.json (string or named list), additional_chat_templates/, and the
    jinja file taking priority over the config, each as transformers reads them."""
    import shutil
    legacy = str(tmp_path / "legacy")
    shutil.copytree(qwen_dir, legacy)
    os.remove(os.path.join(legacy, "chat_template.jinja"))
    cfg_path = os.path.join(legacy, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = [{"name": "default", "template": T.CHATML_TEMPLATE},
                            {"name": "plain", "template": "{% for m in messages %}{{ m.content }}\n{% endfor %}"}]
    json.dump(cfg, open(cfg_path, "w"))
    ours, hf = _pair(legacy)
    assert isinstance(ours.chat_template, dict) and sorted(ours.chat_template) == ["default", "plain"]
    for name in (None, "plain"):
        assert ours.apply_chat_template(CHATS[2], chat_template=name) == _ref(hf, CHATS[2], chat_template=name)
    # the library's own save(): default + named templates as files; transformers reads the same templates
    saved = ours.save(str(tmp_path / "saved"))
    assert os.path.isfile(os.path.join(saved, "additional_chat_templates", "plain.jinja"))
    ours2, hf2 = _pair(saved)
    assert ours2.chat_template == ours.chat_template
    for name in (None, "plain"):
        assert ours2.apply_chat_template(CHATS[3], chat_template=name) == _ref(hf2, CHATS[3], chat_template=name)
    # the jinja file wins over the config entry
    with open(os.path.join(legacy, "chat_template.jinja"), "w") as f:
        f.write("{{ messages[0].content }}")
    ours3, hf3 = _pair(legacy)
    assert ours3.apply_chat_template(CHATS[0], tokenize=False) == _ref(hf3, CHATS[0], tokenize=False) == \
        "Hello world"
    cfg["chat_template"] = [{"name": "a", "template": "x"}, {"name": "b", "template": "y"}]
    os.remove(os.path.join(legacy, "chat_template.jinja"))
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="none is 'default'"):
        T.load_tokenizer(legacy).apply_chat_template(CHATS[0])


def test_special_tokens_and_eos_ids(qwen_dir, tmp_path):
    tok = T.load_tokenizer(qwen_dir)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None and tok.bos_id is None
    assert tok.eos_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    assert tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert T.load_tokenizer(qwen_dir, padding_side="left").padding_side == "left"
    with pytest.raises(ValueError, match="no tokenizer.json"):
        T.load_tokenizer(str(tmp_path))
    # padding / truncation stored in tokenizer.json are switched off: ids are the text's own
    raw = RawTokenizer.from_file(os.path.join(qwen_dir, "tokenizer.json"))
    raw.enable_padding(length=32)
    raw.enable_truncation(max_length=2)
    raw.save(str(tmp_path / "tokenizer.json"))
    assert T.load_tokenizer(str(tmp_path)).encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert len(tok.encode(TEXTS[0])) > 2


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_word_tokenizer_roundtrips_through_transformers(style, tmp_path):
    words = ["tom", "has", "3", "apples", "sorry", "cannot", "help", "how", "to", "make", "bomb"]
    path = T.build_word_tokenizer(str(tmp_path / style), words, style=style, model_max_length=64)
    ours, hf = _pair(path)
    assert ours.vocab_size == len(hf) == len(T.STYLES[style].control) + len(T.STYLES[style].plain_added) + len(
        T.STYLES[style].roles) + len(words)
    assert ours.model_max_length == 64
    chats = [[{"role": "user", "content": "how to make bomb"}],
             [{"role": "system", "content": "tom"}, {"role": "user", "content": "tom has 3 apples"},
              {"role": "assistant", "content": "sorry cannot help"}, {"role": "user", "content": "how to"}]]
    for chat in chats:
        for gen in (False, True):
            ids = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert ids == _ref(hf, chat, add_generation_prompt=gen)
            assert ours.unk_id not in ids
    assert ours.encode("tom has zebra", add_special_tokens=False) == [ours.token_to_id("tom"),
                                                                      ours.token_to_id("has"), ours.unk_id]
    assert ours.encode("tom") == hf.encode("tom")
    assert (ours.encode("tom")[0] == ours.bos_id) == (style == "llama3")
    ids = ours.apply_chat_template(chats[1])
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="without whitespace"):
        T.word_tokenizer(["two words"])
    with pytest.raises(ValueError, match="style"):
        T.word_tokenizer(words, style="gpt2")
