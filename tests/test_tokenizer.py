"""loraserve.tokenizer against transformers' AutoTokenizer (the oracle) on the same directory.

Tokenizers under test: the embedded SmolLM2 (converted once per session into the cache), and
three built here without any download: a GPT-2 style byte-level BPE, a SentencePiece-style BPE
with byte fallback and a BOS-adding post_processor, and a WordLevel with no decoder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as BackendTokenizer

from loraserve.model.embedded import embedded_model_dir
from loraserve.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading,   internal   spaces\t\ttabs\n\n\nnewlines  ",
    "héllo wörld — naïve café résumé",
    "日本語のテキスト and 你好",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷",
    "numbers 1234567 3.14159 -42",
    "specials inline: <|im_start|>user<|im_end|> <s></s> <|pad|> <image><tool_call>",
    "don't stop , won't . it's ? ok !",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello there! Hello again.",
    "naïve café résumé wörld",
    "numbers 123 456 3.14",
    "don't stop won't it's",
] * 20

CHATML = """\
{%- set ns = namespace(turns=0) -%}
{%- if tools -%}
<|im_start|>system
Tools: {{ tools | tojson(indent=2, sort_keys=True) }}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'stop' %}{% break %}{% endif -%}
{%- if message['role'] not in ['system', 'user', 'assistant'] -%}
{{ raise_exception('unknown role: ' + message['role']) }}
{%- endif -%}
{%- set ns.turns = ns.turns + 1 -%}
<|im_start|>{{ message['role'] }}
{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>
{% endif -%}
{%- if message['role'] == 'assistant' -%}
{% generation %}{{ message['content'] }}{% endgeneration %}
{%- else -%}
{{ message['content'] }}
{%- endif -%}
{% if message.meta is defined %} {{ message.meta | tojson }}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif -%}
{%- endif -%}
{{- '' if ns.turns else eos_token -}}
{{- '' if strftime_now('%Y') | int > 2000 else 'clock?' -}}
{{- image_token if image_token is defined else '' -}}
{{- pad_token -}}"""

LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA2_TOOLS = "{{ bos_token }}[TOOLS]{{ tools | tojson }}[/TOOLS]" + LLAMA2.removeprefix(
    "{{ bos_token }}"
)
PLAIN_TEMPLATE = "{% for m in messages %}{{ m.role }} : {{ m.content }} ; {% endfor %}"

SYSTEM_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Héllo 😀, what's 2+2?"},
]
MULTI_TURN = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi!", "meta": {"ünï": "cödé", "n": [1, 2.5, None]}},
    {"role": "assistant", "content": "Hello.", "reasoning": "greet back", "tool_calls": None},
    {"role": "user", "content": "Tell me a joke.\n"},
]
USER_ONLY = [{"role": "user", "content": "What is the capital of France?"}]
ALTERNATING = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city — °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


# ---------------------------------------------------------------------------------------------
# Tokenizers built in-process


def _train(tokenizer: BackendTokenizer, trainer: trainers.Trainer) -> BackendTokenizer:
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _byte_level_bpe() -> BackendTokenizer:
    """GPT-2 style: byte-level pre-tokenizer and decoder, no BOS."""
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return _train(tok, trainer)


def _sentencepiece_bpe() -> BackendTokenizer:
    """Llama-2 style: '▁' for spaces, byte fallback for unseen characters, BOS added."""
    tok = BackendTokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40
    )
    tok = _train(tok, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces, as SentencePiece vocabularies have them
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = BackendTokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _word_level() -> BackendTokenizer:
    """BERT-ish words, no decoder (ids decode to tokens joined by spaces)."""
    tok = BackendTokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"])
    return _train(tok, trainer)


def _write(folder: Path, backend: BackendTokenizer, files: dict[str, dict | str]) -> Path:
    """A model directory: tokenizer.json plus `files` (dicts are written as JSON)."""
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded model, converted at most once (the cache persists across sessions)."""
    return embedded_model_dir()


BYTE_LEVEL_FILES = {
    "tokenizer_config.json": {
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",  # not in tokenizer.json: HF adds it
        "image_token": "<image>",  # model-specific special token
        "additional_special_tokens": ["<tool_call>"],
        "chat_template": CHATML,
    },
    "generation_config.json": {"eos_token_id": [0, 2]},
}
SENTENCEPIECE_FILES = {
    "tokenizer_config.json": {
        "add_bos_token": True,  # ignored by HF 5: the post_processor decides
        "add_eos_token": False,
        "chat_template": [
            {"name": "default", "template": LLAMA2},
            {"name": "tool_use", "template": LLAMA2_TOOLS},
        ],
    },
    # Legacy layout: the special tokens only in special_tokens_map.json.
    "special_tokens_map.json": {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "lstrip": False, "rstrip": False},
        "unk_token": "<unk>",
    },
    "config.json": {"eos_token_id": 2, "bos_token_id": 1},
}
WORD_LEVEL_FILES = {
    "tokenizer_config.json": {
        "eos_token": "[EOS]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": True,
        "chat_template": "overridden by chat_template.jinja",
    },
    "chat_template.jinja": PLAIN_TEMPLATE,
}


@pytest.fixture(scope="session")
def trained_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    byte_level = _byte_level_bpe()
    no_template = {"tokenizer_config.json": {"eos_token": "<|im_end|>"}}
    return {
        "byte_level": _write(root / "byte_level", byte_level, BYTE_LEVEL_FILES),
        "sentencepiece": _write(root / "sentencepiece", _sentencepiece_bpe(), SENTENCEPIECE_FILES),
        "word_level": _write(root / "word_level", _word_level(), WORD_LEVEL_FILES),
        "no_template": _write(root / "no_template", byte_level, no_template),
    }


ALL = ["smollm", "byte_level", "sentencepiece", "word_level"]


@pytest.fixture(scope="session")
def model_dirs(smollm_dir: Path, trained_dirs: dict[str, Path]) -> dict[str, Path]:
    return {"smollm": smollm_dir, **trained_dirs}


@pytest.fixture(scope="session")
def ours(model_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    loaded = {name: Tokenizer.from_dir(path) for name, path in model_dirs.items()}
    assert all(tok is not None for tok in loaded.values())
    return loaded


@pytest.fixture(scope="session")
def hf(model_dirs: dict[str, Path]) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(path)) for name, path in model_dirs.items()}


# ---------------------------------------------------------------------------------------------
# Parity with HF


@pytest.mark.parametrize("name", ALL)
def test_encode_matches_hf(name: str, ours: dict, hf: dict) -> None:
    for text in TEXTS:
        assert ours[name].encode(text) == hf[name](text)["input_ids"], text
        expected = hf[name](text, add_special_tokens=False)["input_ids"]
        assert ours[name].encode(text, add_special_tokens=False) == expected, text


@pytest.mark.parametrize("name", ALL)
def test_decode_matches_hf(name: str, ours: dict, hf: dict) -> None:
    rng = random.Random(0)
    vocab = ours[name].vocab_size
    random_ids = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 30))] for _ in range(30)]
    for ids in [hf[name](text)["input_ids"] for text in TEXTS] + random_ids:
        for skip in (True, False):
            expected = hf[name].decode(ids, skip_special_tokens=skip)
            assert ours[name].decode(ids, skip_special_tokens=skip) == expected, (ids, skip)


@pytest.mark.parametrize("name", ALL)
def test_vocab_and_tokens_match_hf(name: str, ours: dict, hf: dict) -> None:
    assert ours[name].vocab_size == len(hf[name])
    ids = [0, 1, 2, 5, ours[name].vocab_size - 1]
    assert [ours[name].id_to_token(i) for i in ids] == hf[name].convert_ids_to_tokens(ids)
    assert ours[name].id_to_token(ours[name].vocab_size + 10) is None
    assert ours[name].bos_token_id == hf[name].bos_token_id


@pytest.mark.parametrize(
    ("name", "messages"),
    [
        ("smollm", SYSTEM_USER),
        ("smollm", MULTI_TURN),
        ("smollm", USER_ONLY),
        ("byte_level", SYSTEM_USER),
        ("byte_level", MULTI_TURN),
        ("byte_level", [*USER_ONLY, {"role": "stop", "content": ""}, *USER_ONLY]),
        ("sentencepiece", USER_ONLY),
        ("sentencepiece", ALTERNATING),
        ("word_level", MULTI_TURN),
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(
    name: str, messages: list[dict], add_generation_prompt: bool, ours: dict, hf: dict
) -> None:
    expected = hf[name].apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    actual = ours[name].apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert actual == expected


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_chat_template_with_tools_and_kwargs_matches_hf(name: str, ours: dict, hf: dict) -> None:
    messages = USER_ONLY
    kwargs = {"enable_thinking": False, "tools": TOOLS, "add_generation_prompt": True}
    expected = hf[name].apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours[name].apply_chat_template(messages, **kwargs) == expected
    assert "°C" in expected  # tojson keeps non-ASCII characters


def test_template_errors_like_hf(ours: dict, hf: dict) -> None:
    bad = [{"role": "system", "content": "x"}, *USER_ONLY]  # Llama 2: roles must alternate
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        hf["sentencepiece"].apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="alternate"):
        ours["sentencepiece"].apply_chat_template(bad)
    with pytest.raises(ValueError, match="unknown role: tool"):
        ours["byte_level"].apply_chat_template([{"role": "tool", "content": "1"}])
    with pytest.raises(ValueError, match="empty conversation"):
        ours["byte_level"].apply_chat_template([])
    with pytest.raises(ValueError, match="dicts"):
        ours["byte_level"].apply_chat_template(["hello"])


def test_no_chat_template(trained_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(trained_dirs["no_template"])
    assert tok is not None and not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template.*completion prompt"):
        tok.apply_chat_template(USER_ONLY)


# ---------------------------------------------------------------------------------------------
# Special tokens


def test_smollm_special_ids(ours: dict) -> None:
    tok = ours["smollm"]
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and im_end in tok.eos_token_ids
    assert tok.bos_token_id == tok.token_to_id("<|im_start|>")
    assert tok.has_chat_template
    assert tok.encode("Hello")[0] != tok.bos_token_id  # SmolLM2 adds no BOS


def test_eos_ids_union_of_configs(ours: dict, hf: dict) -> None:
    tok = ours["byte_level"]
    # tokenizer_config eos (<|im_end|> = 2) + generation_config [0, 2]
    assert tok.eos_token_ids == {0, 2} and hf["byte_level"].eos_token_id == 2
    assert ours["sentencepiece"].eos_token_ids == {hf["sentencepiece"].eos_token_id, 2}
    assert ours["word_level"].eos_token_ids == {hf["word_level"].eos_token_id}


def test_bos_comes_from_post_processor_only(ours: dict, hf: dict) -> None:
    """transformers 5 ignores tokenizer_config's add_bos_token when tokenizer.json exists."""
    sp = ours["sentencepiece"]
    assert sp.encode("hello")[0] == sp.bos_token_id == 1
    assert sp.encode("hello", add_special_tokens=False)[0] != 1


def test_config_special_tokens_are_registered(ours: dict, hf: dict) -> None:
    tok = ours["byte_level"]
    for token in ("<|pad|>", "<image>", "<tool_call>"):
        token_id = tok.token_to_id(token)
        assert token_id is not None and token_id == hf["byte_level"].convert_tokens_to_ids(token)
        assert tok.encode(f"a{token}b", add_special_tokens=False).count(token_id) == 1
        assert tok.decode([token_id]) == ""


_END = {"content": "<|end|>", "lstrip": False, "rstrip": True, "normalized": False}
_END_ENTRY = {"351": {**_END, "single_word": False, "special": False}}


@pytest.mark.parametrize(
    ("in_tokenizer_json", "config"),
    [
        # a named special token that tokenizer.json lists as a plain added token: made special
        ({"special": False, "lstrip": True}, {"eos_token": "<|end|>"}),
        # ... also when tokenizer_config's added_tokens_decoder lists it, with its flags
        (
            {"special": False, "lstrip": True},
            {"eos_token": "<|end|>", "added_tokens_decoder": _END_ENTRY},
        ),
        # added_tokens_decoder flags override tokenizer.json's; not named: stays non-special
        ({"special": False, "lstrip": True}, {"added_tokens_decoder": _END_ENTRY}),
        # an extra special token that exists already is left alone
        ({"special": False, "lstrip": True}, {"additional_special_tokens": ["<|end|>"]}),
        # a named special token with its own flags, absent from tokenizer.json: added
        (None, {"eos_token": {**_END, "__type": "AddedToken"}}),
    ],
)
def test_added_token_flags_match_hf(
    in_tokenizer_json: dict | None, config: dict, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    backend = _byte_level_bpe()
    if in_tokenizer_json is not None:
        backend.add_tokens([AddedToken("<|end|>", **in_tokenizer_json)])
    folder = _write(tmp_path / "tok", backend, {"tokenizer_config.json": config})
    ours, theirs = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours is not None
    for text in ("a <|end|> b", "x<|end|>y", "<|end|>\n\n<|end|>"):
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip), text


# ---------------------------------------------------------------------------------------------
# Loading


def test_from_dir_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path) is None


def test_corrupt_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_config_names_the_file(trained_dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(
        (trained_dirs["byte_level"] / "tokenizer.json").read_bytes()
    )
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_read_from_jinja_file(smollm_dir: Path, tmp_path: Path) -> None:
    """transformers 5 writes chat_template.jinja; the template must be found there alone."""
    (tmp_path / "tokenizer.json").write_bytes((smollm_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok is not None
    assert tok.apply_chat_template(USER_ONLY) == "user : What is the capital of France? ; "


# ---------------------------------------------------------------------------------------------
# Incremental detokenization


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool) -> tuple[str, list]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return detok.text, pieces


def _partial_char_ids(tok: Tokenizer) -> list[int]:
    """Ids whose text alone is an incomplete UTF-8 sequence (byte tokens and the like)."""
    return [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]


@pytest.fixture(scope="session")
def id_pools(ours: dict) -> dict[str, list[int]]:
    return {name: _partial_char_ids(tok) for name, tok in ours.items()}


def _ids(tok: Tokenizer, partial: list[int], max_size: int) -> st.SearchStrategy[list[int]]:
    specials = list(range(5))
    return st.lists(
        st.one_of(
            st.sampled_from(partial),
            st.sampled_from(specials),
            st.integers(0, tok.vocab_size - 1),
        ),
        max_size=max_size,
    )


@pytest.mark.parametrize("name", ["smollm", "byte_level"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stream_equals_decode_byte_level(
    name: str, data: st.DataObject, ours: dict, id_pools: dict
) -> None:
    """Byte-level tokenizers: streamed text == decode(generated ids), whatever the prompt."""
    tok = ours[name]
    prompt = data.draw(_ids(tok, id_pools[name], 8), label="prompt")
    ids = data.draw(_ids(tok, id_pools[name], 40), label="generated")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    text, _ = _stream(tok, prompt, ids, skip)
    assert text == tok.decode(ids, skip_special_tokens=skip)


def _whole_char_ids(tok: Tokenizer, partial: list[int]) -> st.SearchStrategy[list[int]]:
    """Generated ids whose bytes always form whole characters: whole-text tokens, special
    tokens, and the byte-token runs of complete characters. (A byte-fallback decoder turns a
    run of byte tokens that is not valid UTF-8 into U+FFFDs as a whole, rewriting characters
    already streamed; no streaming detokenizer can follow that.)"""
    partial_set = set(partial)
    whole = [i for i in range(tok.vocab_size) if i not in partial_set]
    encode_char = st.characters(codec="utf-8").map(
        lambda char: tok.encode(char, add_special_tokens=False)
    )
    one_id = st.one_of(st.sampled_from(whole), st.sampled_from(range(5))).map(lambda i: [i])
    chunks = st.lists(st.one_of(one_id, encode_char), max_size=30)
    return chunks.map(lambda lists: [i for ids in lists for i in ids])


@pytest.mark.parametrize("name", ["sentencepiece", "word_level"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stream_continues_the_prompt(
    name: str, data: st.DataObject, ours: dict, id_pools: dict
) -> None:
    """Other decoders: streamed text == what the generated ids add to the prompt's text."""
    tok = ours[name]
    prompt = tok.encode(data.draw(st.sampled_from(TEXTS[:6]), label="prompt"))
    ids = data.draw(_whole_char_ids(tok, id_pools[name]), label="generated")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    text, _ = _stream(tok, prompt, ids, skip)
    before = tok.decode(prompt, skip, clean_up_tokenization_spaces=False)
    after = tok.decode(prompt + ids, skip, clean_up_tokenization_spaces=False)
    assert after.startswith(before)
    assert text == after[len(before) :]


def test_stream_holds_back_incomplete_characters(ours: dict) -> None:
    tok = ours["smollm"]
    ids = tok.encode("a 😀 b")
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"))
    pieces = [detok.add(i) for i in ids]
    assert "" in pieces and " 😀" in pieces  # the emoji's bytes arrive over several tokens
    assert all("\ufffd" not in piece for piece in pieces)
    assert detok.text == "a 😀 b" == tok.decode(ids)


def test_stream_flush_emits_trailing_partial_character(ours: dict) -> None:
    tok = ours["smollm"]
    first_byte = tok.encode("😀")[0]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(tok.encode("x")[0]) == "x"
    assert detok.add(first_byte) == ""
    assert detok.flush() == "\ufffd" and detok.text == tok.decode([tok.encode("x")[0], first_byte])


def test_stream_keeps_leading_space_of_sentencepiece_continuation(ours: dict) -> None:
    tok = ours["sentencepiece"]
    prompt = tok.encode("hello")
    ids = tok.encode("world", add_special_tokens=False)  # '▁world': a space, then 'world'
    text, _ = _stream(tok, prompt, ids, skip=True)
    assert text == " world" and tok.decode(ids) == "world"


def test_stream_window_stays_small(ours: dict) -> None:
    """Each step decodes a few tokens, not the whole output."""
    tok = ours["smollm"]
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 60)
    detok = IncrementalDetokenizer(tok, [])
    longest = 0
    for i in ids:
        detok.add(i)
        longest = max(longest, len(detok._window))
    assert detok.text == tok.decode(ids)
    assert longest <= 4
