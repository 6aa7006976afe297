"""Hugging Face tokenizers and chat templates, read and applied without transformers.

A tokenizer directory holds ``tokenizer.json`` (read by the ``tokenizers`` library), ``tokenizer_config.json``
(special tokens, padding side, and possibly the chat template), optionally ``special_tokens_map.json``,
``chat_template.jinja`` and ``additional_chat_templates/<name>.jinja`` (named templates), and, in a model
directory, ``generation_config.json`` (extra end-of-sequence ids). :func:`load_tokenizer` reads all of them.

Chat templates are rendered the way transformers renders them: a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension and a ``{% generation %}`` block (rendered
as its body), the globals ``raise_exception``, ``strftime_now``, ``namespace`` and ``dict``, a ``tojson``
filter that does not escape HTML (``ensure_ascii``, ``indent``, ``separators``, ``sort_keys``), and the
template variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the named special tokens
(``bos_token``, ``eos_token``, …) and any extra keyword (``enable_thinking`` for Qwen3, ``date_string`` for
Llama 3). Message keys whose value is None are dropped; a message's reasoning given as ``reasoning_content``,
``thinking`` or ``reasoning`` is visible under the first two names. The rendered text is encoded without
adding special tokens (the template writes them).

Arrays: a batch of texts is ``tokens`` (B, T) int32 padded with :attr:`Tokenizer.pad_id`, ``attention_mask``
(B, T) int32 (1 on real tokens, 0 on padding; left or right) and ``lengths`` (B,) int32.

:func:`word_tokenizer` builds a tokenizer for a closed word vocabulary (whitespace-split words, one id each)
with a ChatML (Qwen3-style) or Llama-3-style chat template; :meth:`Tokenizer.save` writes it as a directory
that transformers' ``AutoTokenizer`` loads with the same ids.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np
import tokenizers
from tokenizers import models as tk_models
from tokenizers import pre_tokenizers as tk_pre
from tokenizers import processors as tk_processors

__all__ = [
    "SPECIAL_TOKEN_NAMES", "CHATML_TEMPLATE", "LLAMA3_TEMPLATE", "STYLES",
    "TextBatch", "Tokenizer", "load_tokenizer", "word_tokenizer", "build_word_tokenizer",
]

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# A Qwen3-style ChatML template: optional tools in the system turn, <think> blocks shown only for assistant
# turns after the last user query (split off the content when given inline), and `enable_thinking=False`
# opening an empty think block in the generation prompt.
CHATML_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nFunction signatures, one JSON object per line:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nTo call a function, answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>.' }}
{{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}
{%- if m.role == 'user' and not (m.content is string and m.content.startswith('<tool_response>')) %}
{%- set ns.last_query = loop.index0 %}
{%- endif %}
{%- endfor %}
{%- for m in messages %}
{%- set content = m.content if m.content is string else '' %}
{%- if m.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('a system message may only come first') }}{%- endif %}
{%- elif m.role == 'user' %}
{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' }}
{%- elif m.role == 'assistant' %}
{%- set reasoning = '' %}
{%- if m.reasoning_content is string %}
{%- set reasoning = m.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' }}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}
{{- content }}
{%- endif %}
{%- for call in m.tool_calls or [] %}
{%- set f = call.function if call.function is defined else call %}
{{- '\\n<tool_call>\\n' + ({'name': f.name, 'arguments': f.arguments} | tojson) + '\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif m.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- raise_exception('unknown role ' + m.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

# A Llama-3-style template: <bos>, then one header + trimmed content + <|eot_id|> per turn.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for m in messages %}
{%- if m.role not in ['system', 'user', 'assistant', 'ipython', 'tool'] %}
{{- raise_exception('unknown role ' + m.role) }}
{%- endif %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + (m.content | trim) + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""


class _Style(NamedTuple):
    specials: Dict[str, str]        # named special tokens (bos_token, eos_token, pad_token, unk_token)
    control: tuple                  # every special added token, in id order
    plain_added: tuple              # added tokens that are not special (Qwen's <think>, </think>)
    roles: tuple                    # role words the template writes as text
    template: str
    add_bos: bool                   # encode(add_special_tokens=True) prepends bos


STYLES = {
    "chatml": _Style({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
                     ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"), ("<think>", "</think>"),
                     ("system", "user", "assistant", "tool"), CHATML_TEMPLATE, False),
    "llama3": _Style({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                      "pad_token": "<|finetune_right_pad_id|>", "unk_token": "<unk>"},
                     ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>", "<|finetune_right_pad_id|>", "<unk>"), (),
                     ("system", "user", "assistant", "ipython", "tool"), LLAMA3_TEMPLATE, True),
}


class TextBatch(NamedTuple):
    """Padded token ids of B texts: tokens (B, T) int32, attention_mask (B, T) int32, lengths (B,) int32."""
    tokens: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray


# --------------------------------------------------------------------------- the template environment


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` (assistant-mask markers in some templates): rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attribute names (no way to CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - the same signature trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template namespace may not hold the attribute {name!r}")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` inside templates, without access to the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=_Dict())
    return env


def _plain(value: Any) -> Any:
    """What a template may see: JSON-like values rebuilt from plain types; anything else as ``<TypeName>``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    for base in (str, bool, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _normalise_chat(messages: Sequence[Mapping]) -> List[dict]:
    """Drop None-valued keys; expose a message's reasoning as ``thinking`` and ``reasoning_content``."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"chat message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# --------------------------------------------------------------------------- the tokenizer


def _token_content(value) -> Optional[str]:
    """A special-token entry of tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with its special tokens, padding side and chat template(s).

    Args:
      backend: the ``tokenizers.Tokenizer`` (padding and truncation of its own are switched off).
      special_tokens: {name: token string} for names in :data:`SPECIAL_TOKEN_NAMES` (missing = not set).
      chat_template: one jinja template, or {name: template} with ``"default"`` (and ``"tool_use"``).
      padding_side, truncation_side: ``"right"`` or ``"left"``; the defaults of :meth:`encode_batch`.
      clean_up_tokenization_spaces: decode as transformers does with this setting (ignored for BPE models).
      eos_ids: every id that ends a generation (default: the eos token's id).
      model_max_length: the longest sequence the model takes (informational).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: Optional[Mapping[str, str]] = None,
                 chat_template: Union[None, str, Mapping[str, str]] = None, padding_side: str = "right",
                 truncation_side: str = "right", clean_up_tokenization_spaces: bool = False,
                 eos_ids: Optional[Sequence[int]] = None, model_max_length: Optional[int] = None):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r} is not allowed: 'left' or 'right'")
        unknown = sorted(set(special_tokens or {}) - set(SPECIAL_TOKEN_NAMES))
        if unknown:
            raise ValueError(f"special_tokens has unknown names {unknown}; allowed: {list(SPECIAL_TOKEN_NAMES)}")
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.model_max_length = model_max_length
        base = [] if self.eos_id is None else [self.eos_id]
        self.eos_ids = tuple(dict.fromkeys(base + [int(i) for i in (eos_ids or ())]))
        self._env = _environment()
        self._compiled: Dict[str, jinja2.Template] = {}

    # ---- special tokens

    def _special_id(self, name: str) -> Optional[int]:
        tok = self.special_tokens.get(name)
        return None if tok is None else self.backend.token_to_id(tok)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"), doc="the bos token string or None")
    eos_token = property(lambda self: self.special_tokens.get("eos_token"), doc="the eos token string or None")
    pad_token = property(lambda self: self.special_tokens.get("pad_token"), doc="the pad token string or None")
    unk_token = property(lambda self: self.special_tokens.get("unk_token"), doc="the unk token string or None")
    bos_id = property(lambda self: self._special_id("bos_token"), doc="id of the bos token, or None")
    eos_id = property(lambda self: self._special_id("eos_token"), doc="id of the eos token, or None")
    unk_id = property(lambda self: self._special_id("unk_token"), doc="id of the unk token, or None")

    @property
    def pad_id(self) -> int:
        """The id written into padding: the pad token's, else the eos token's, else 0 (masked out either way)."""
        for name in ("pad_token", "eos_token"):
            i = self._special_id(name)
            if i is not None:
                return i
        return 0

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.backend.id_to_token(int(i))

    # ---- encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = True) -> List[int]:
        """Token ids of one text; ``add_special_tokens`` applies the post-processor (e.g. Llama's bos)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (list or 1-D array), as transformers' ``decode``."""
        text = self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                   skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_spaces(text)
        return text

    def batch_decode(self, ids, *, skip_special_tokens: bool = False) -> List[str]:
        """Texts of a (B, T) array or a list of id lists."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    def pad(self, sequences: Sequence[Sequence[int]], *, max_length: Optional[int] = None,
            pad_to: Optional[int] = None, padding_side: Optional[str] = None,
            truncation_side: Optional[str] = None) -> TextBatch:
        """Pad id lists into a :class:`TextBatch`.

        ``max_length`` truncates each sequence (on ``truncation_side``); ``pad_to`` fixes T (default: the
        longest sequence after truncation); ``padding_side`` puts the padding on the left (generation) or right.
        """
        padding_side = padding_side or self.padding_side
        truncation_side = truncation_side or self.truncation_side
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r} is not allowed: 'left' or 'right'")
        seqs = [list(s) for s in sequences]
        if max_length is not None:
            if max_length < 1:
                raise ValueError(f"max_length={max_length!r} is not allowed: an integer >= 1")
            seqs = [s[:max_length] if truncation_side == "right" else s[max(len(s) - max_length, 0):] for s in seqs]
        longest = max((len(s) for s in seqs), default=0)
        T = longest if pad_to is None else int(pad_to)
        if T < longest:
            raise ValueError(f"pad_to={pad_to!r} is not allowed: at least the longest sequence, {longest}")
        tokens = np.full((len(seqs), T), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), T), np.int32)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if padding_side == "right" else slice(T - len(s), T)
            tokens[i, sl] = s
            mask[i, sl] = 1
        return TextBatch(tokens, mask, np.array([len(s) for s in seqs], np.int32))

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True,
                     max_length: Optional[int] = None, pad_to: Optional[int] = None,
                     padding_side: Optional[str] = None, truncation_side: Optional[str] = None) -> TextBatch:
        """Encode B texts and pad them (see :meth:`pad`) into tokens (B, T), attention_mask (B, T), lengths (B,)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts; use encode for one text")
        ids = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return self.pad(ids, max_length=max_length, pad_to=pad_to, padding_side=padding_side,
                        truncation_side=truncation_side)

    # ---- chat templates

    def get_chat_template(self, chat_template: Optional[str] = None, tools=None) -> str:
        """The template text: the argument (a template, or the name of one of several), else the tokenizer's."""
        if isinstance(self.chat_template, dict):
            if chat_template is not None and chat_template in self.chat_template:
                return self.chat_template[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in self.chat_template:
                    return self.chat_template["tool_use"]
                if "default" in self.chat_template:
                    return self.chat_template["default"]
                raise ValueError(f"the tokenizer has several chat templates and none is 'default': pass one of "
                                 f"{sorted(self.chat_template)} as chat_template")
            return chat_template
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template (no tokenizer_config.json 'chat_template' and no "
                             "chat_template.jinja); pass chat_template=")
        return self.chat_template

    def _template(self, text: str) -> jinja2.Template:
        if text not in self._compiled:
            self._compiled[text] = self._env.from_string(text)
        return self._compiled[text]

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, tokenize: bool = True,
                            continue_final_message: bool = False, chat_template: Optional[str] = None,
                            tools: Optional[Sequence[Mapping]] = None, documents: Optional[Sequence[Mapping]] = None,
                            **template_kwargs) -> Union[str, List[int], List[str], List[List[int]]]:
        """Render a conversation (a list of {"role", "content", …} dicts) with the chat template.

        Returns the text (``tokenize=False``) or its ids (encoded without adding special tokens); a list of
        conversations gives a list of results. ``add_generation_prompt`` appends the opening of an assistant
        turn; ``continue_final_message`` leaves the last message open (a prefill the model continues), and
        excludes ``add_generation_prompt``. ``tools`` are JSON-schema dicts; ``template_kwargs`` become template
        variables and override the special tokens of the same name.
        """
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
            return [self.apply_chat_template(m, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                             continue_final_message=continue_final_message,
                                             chat_template=chat_template, tools=tools, documents=documents,
                                             **template_kwargs) for m in messages]
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON-schema dicts")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise TypeError("documents must be dicts (with 'title' and 'text')")
        text_template = self.get_chat_template(chat_template, tools)
        chat = _normalise_chat(messages)
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise ValueError("continue_final_message needs a final message with string content")
            chat[-1]["content"] = final + tag
        variables = {**self.special_tokens, **_plain(template_kwargs)}
        text = self._template(text_template).render(messages=chat, tools=_plain(tools),
                                                    documents=_plain(documents),
                                                    add_generation_prompt=add_generation_prompt, **variables)
        if continue_final_message:
            if final.strip() not in text or tag.strip() not in text:
                raise ValueError("continue_final_message: the chat template does not render the final message "
                                 "verbatim, so it cannot be left open")
            at = text.rindex(tag.strip())
            text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- saving

    def save(self, path: str) -> str:
        """Write tokenizer.json, tokenizer_config.json and the chat template(s) into directory ``path``.

        The layout is the one transformers writes and reads (``chat_template.jinja`` for the default template,
        ``additional_chat_templates/<name>.jinja`` for named ones). Returns ``path``.
        """
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                  "padding_side": self.padding_side, "truncation_side": self.truncation_side,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.model_max_length is not None:
            config["model_max_length"] = int(self.model_max_length)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        templates = self.chat_template if isinstance(self.chat_template, dict) else (
            {} if self.chat_template is None else {"default": self.chat_template})
        for name, text in templates.items():
            if name == "default":
                target = os.path.join(path, "chat_template.jinja")
            else:
                if os.path.basename(name) != name or name in ("", ".", ".."):
                    raise ValueError(f"chat template name {name!r} is not allowed: a plain file name")
                os.makedirs(os.path.join(path, "additional_chat_templates"), exist_ok=True)
                target = os.path.join(path, "additional_chat_templates", f"{name}.jinja")
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
        return path


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_tokenizer(path: str, *, padding_side: Optional[str] = None) -> Tokenizer:
    """Read a Hugging Face tokenizer (or model) directory: tokenizer.json plus its configuration files.

    The chat template comes from ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` when present
    (they take priority, as in transformers), else from tokenizer_config.json's ``chat_template`` (a string, or
    a list of {"name", "template"}). Special tokens come from tokenizer_config.json, else from
    special_tokens_map.json; extra end-of-sequence ids from generation_config.json's ``eos_token_id``.
    ``padding_side`` overrides the configured side.
    """
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise ValueError(f"tokenizer path {path!r} has no tokenizer.json (a Hugging Face 'fast' tokenizer "
                         "directory is needed)")
    backend = tokenizers.Tokenizer.from_file(tok_file)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    config = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
    map_file = os.path.join(path, "special_tokens_map.json")
    token_map = _read_json(map_file) if os.path.isfile(map_file) else {}
    specials = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = _token_content(config.get(name)) if name in config else _token_content(token_map.get(name))
        if value is not None:
            specials[name] = value
    templates: Dict[str, str] = {}
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            templates["default"] = f.read()
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    templates[name[:-len(".jinja")]] = f.read()
    if templates:
        chat_template = templates["default"] if list(templates) == ["default"] else templates
    else:
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):
            chat_template = {t["name"]: t["template"] for t in chat_template}
    eos_ids = []
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        eos = _read_json(gen_file).get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if config.get("split_special_tokens"):
        backend.encode_special_tokens = True
    max_len = config.get("model_max_length")
    max_len = max_len if isinstance(max_len, int) and max_len < 2**40 else None   # transformers' 'unset' is 1e30
    return Tokenizer(backend, special_tokens=specials, chat_template=chat_template,
                     padding_side=padding_side or config.get("padding_side", "right"),
                     truncation_side=config.get("truncation_side", "right"),
                     clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
                     eos_ids=eos_ids, model_max_length=max_len)


# --------------------------------------------------------------------------- word-level tokenizers


def word_tokenizer(words: Sequence[str], *, style: str = "chatml", chat_template: Optional[str] = None,
                   model_max_length: Optional[int] = None) -> Tokenizer:
    """A tokenizer for a closed vocabulary: whitespace-separated words, one id per word.

    Ids: the style's special tokens first (``chatml``: <|endoftext|> = pad, <|im_start|>, <|im_end|> = eos,
    <unk>, then the added tokens <think>, </think>; ``llama3``: <|begin_of_text|> = bos, <|end_of_text|>,
    <|start_header_id|>, <|end_header_id|>, <|eot_id|> = eos, <|finetune_right_pad_id|> = pad, <unk>), then the
    role words of the template (system, user, assistant, …), then ``words`` in order (repeats dropped). Unknown
    words encode to <unk>. ``llama3`` prepends bos when encoding with special tokens, as Llama 3 does.
    ``chat_template`` replaces the style's template (:data:`CHATML_TEMPLATE` or :data:`LLAMA3_TEMPLATE`).
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not allowed: one of {sorted(STYLES)}")
    st = STYLES[style]
    bad = [w for w in words if not isinstance(w, str) or not w or w != w.strip() or len(w.split()) != 1]
    if bad:
        raise ValueError(f"words must be non-empty strings without whitespace; got {bad[:3]!r}")
    vocab = {}
    for w in (*st.control, *st.plain_added, *st.roles, *words):
        vocab.setdefault(w, len(vocab))
    backend = tokenizers.Tokenizer(tk_models.WordLevel(vocab, unk_token=st.specials["unk_token"]))
    backend.pre_tokenizer = tk_pre.WhitespaceSplit()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in st.control])
    if st.plain_added:
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in st.plain_added])
    if st.add_bos:
        bos = st.specials["bos_token"]
        backend.post_processor = tk_processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return Tokenizer(backend, special_tokens=st.specials, chat_template=chat_template or st.template,
                     model_max_length=model_max_length)


def build_word_tokenizer(path: str, words: Sequence[str], *, style: str = "chatml",
                         chat_template: Optional[str] = None, model_max_length: Optional[int] = None) -> str:
    """Write the :func:`word_tokenizer` of ``words`` as a tokenizer directory at ``path``; returns ``path``."""
    return word_tokenizer(words, style=style, chat_template=chat_template,
                          model_max_length=model_max_length).save(path)
