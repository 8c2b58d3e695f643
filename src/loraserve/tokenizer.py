"""Text <-> token ids, chat templates and streaming detokenization.

Built on the `tokenizers` package only; transformers is never imported at runtime. The contract
is parity with transformers 5's `AutoTokenizer` loading the same directory through its generic
`TokenizersBackend` (what `tokenizer.json`-only models get): `encode`, `decode` and
`apply_chat_template(..., tokenize=False)` return what HF returns. The HF behaviours we copy:

- BOS/EOS come from `tokenizer.json`'s post_processor alone. When a `tokenizer.json` exists,
  transformers 5 drops `add_bos_token` / `add_eos_token` from `tokenizer_config.json`, so a
  tokenizer whose post_processor adds no BOS gets none, whatever the config says.
- Added tokens end up as HF leaves them: `tokenizer_config.json`'s `added_tokens_decoder`
  overrides `tokenizer.json`'s flags; named special tokens (`bos_token`, `eos_token`, ...,
  model-specific `*_token` keys) are flagged special; special tokens missing from
  `tokenizer.json` (named or `additional_special_tokens`) are added. So they encode as one id
  and `decode(skip_special_tokens=True)` drops them.
- `clean_up_tokenization_spaces` applies only to non-BPE models (HF ignores it for BPE).
- Chat templates: `chat_template.jinja` (+ `additional_chat_templates/*.jinja`) replace
  `tokenizer_config.json`'s `chat_template`; rendered in the same sandbox with the same helpers.

Model-specific HF tokenizer classes (e.g. `LlamaTokenizer`) rebuild the pipeline in code in
transformers 5; we always follow `tokenizer.json`, which is what those files say.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"

# The named special tokens transformers knows; templates see each one as a variable.
SPECIAL_TOKEN_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
REPLACEMENT_CHAR = "\ufffd"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A loaded tokenizer: encode/decode, special ids and the chat template of one model.

    Build it with `Tokenizer.from_dir`. Instances are immutable after construction and safe to
    share between threads (the `tokenizers` backend is thread-safe for encode/decode).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: dict[str, str],
        eos_token_ids: frozenset[int],
        bos_token_id: int | None,
        chat_templates: dict[str, str],
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._backend = backend
        self._special_tokens = special_tokens  # {"bos_token": "<s>", ...}: template variables
        self._chat_templates = chat_templates  # {"default": "...", "tool_use": "..."}
        self._clean_up_default = clean_up_tokenization_spaces
        self._is_bpe = type(backend.model).__name__ == "BPE"
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        # Every id the tokenizer can produce or decode, added tokens included (HF's len(tok)).
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Loads the tokenizer of an HF-format model directory.

        Reads tokenizer.json, and when present tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja / chat_template.json, generation_config.json and config.json (for
        eos ids). Returns None when there is no tokenizer.json (token-id prompts still work).
        Raises ValueError naming the file when tokenizer.json or a JSON config fails to parse.
        """
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            logger.info("no %s in %s; only token-id prompts will work", TOKENIZER_FILE, path)
            return None
        backend = _load_backend(path / TOKENIZER_FILE)
        config = _read_json(path / TOKENIZER_CONFIG_FILE)
        named, extra = _special_tokens(config, path)
        _apply_added_tokens(backend, config, named, extra)
        special = {name: token.content for name, token in named.items()}
        bos = special.get("bos_token")
        return cls(
            backend=backend,
            special_tokens=special,
            eos_token_ids=_eos_token_ids(backend, special.get("eos_token"), path),
            bos_token_id=backend.token_to_id(bos) if bos is not None else None,
            chat_templates=_load_chat_templates(path, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @property
    def has_chat_template(self) -> bool:
        """True when the model ships a chat template."""
        return bool(self._chat_templates)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, the post_processor adds BOS/EOS."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of `ids`, as HF's `decode`. Unknown ids are skipped.

        clean_up_tokenization_spaces=None uses the tokenizer_config setting; it never applies to
        BPE models (as in HF).
        """
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean_up = clean_up_tokenization_spaces
        if clean_up is None:
            clean_up = self._clean_up_default
        return _clean_up_tokenization(text) if clean_up and not self._is_bpe else text

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary string of id `i` (e.g. 'Ġhello'), None when out of range."""
        return self._backend.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary string `token`, None when absent."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Renders `messages` with the model's chat template, as HF's `apply_chat_template(...,
        tokenize=False)`.

        The template sees `messages` (None-valued keys dropped), `tools`, `documents`,
        `add_generation_prompt`, every named special token (`bos_token`, `eos_token`, ...) and
        `kwargs` (which win over special tokens). With tools and a template named "tool_use",
        that one is used; otherwise "default". Raises ValueError when the model has no chat
        template, the conversation is empty, or the template fails (e.g. `raise_exception`).
        """
        template = self._select_template(tools)
        _check_chat_inputs(messages, tools)
        chat = _alias_reasoning_fields(_plain([_drop_none(m) for m in messages]))
        documents = _plain(kwargs.pop("documents", None))
        variables = {**self._special_tokens, **_plain(kwargs)}
        try:
            return _compile_template(template).render(
                messages=chat,
                tools=_plain(tools),
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def _select_template(self, tools: list[dict] | None) -> str:
        if not self._chat_templates:
            raise ValueError(
                "this model has no chat template; send a completion prompt (plain text or "
                "token ids) instead of chat messages"
            )
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        raise ValueError(
            f"this model has several chat templates and none is named 'default': "
            f"{sorted(self._chat_templates)}"
        )


class IncrementalDetokenizer:
    """Turns generated ids into text one token at a time, for streaming and stop strings.

    Prefix-offset/read-offset technique (as in vLLM and TGI): keep a window of recent ids,
    decode it, and emit the text beyond what the window's already-read part decoded to. A step
    costs one decode of a few tokens, not of the whole output. Text is withheld while it ends in
    U+FFFD (a multi-byte character whose bytes are not all generated yet).

    Contract: `text` is the concatenation of the pieces returned by `add` (and by `flush`, to
    call once when generation ends). After `flush`, it equals
    `decode(context + generated)[len(decode(context)):]`, context being the last few prompt
    ids. For byte-level tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) that is exactly
    `tokenizer.decode(generated_ids)`. For SentencePiece-style decoders that strip the leading
    space of a sequence (Llama 2, Mistral), the first piece keeps its space, as the completion
    of the prompt should. Not covered: `clean_up_tokenization_spaces` (non-BPE models only),
    and byte-fallback runs that are invalid UTF-8 (the decoder then turns the whole run into
    U+FFFDs, rewriting characters already streamed).
    """

    _CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context, context_text = self._context(prompt_ids)
        self._window: list[int] = context  # ids from the prefix offset on
        self._read = len(context)  # window[:_read] has been emitted (or is prompt)
        self._read_text = context_text  # decode(window[:_read])
        self.text = ""

    def _context(self, prompt_ids: Sequence[int]) -> tuple[list[int], str]:
        """The last few prompt ids and their text, starting on a character boundary (a window
        that starts inside a byte-fallback run decodes to U+FFFDs). Empty when the prompt ends
        inside a character: its bytes cannot be completed cleanly, so the output starts from
        scratch (orphan continuation bytes then decode as U+FFFD, as in decode(generated))."""
        for size in range(self._CONTEXT_TOKENS, self._CONTEXT_TOKENS + 4):
            context = list(prompt_ids[-size:])
            text = self._decode(context)
            if not text.endswith(REPLACEMENT_CHAR):
                return context, text
            if size >= len(prompt_ids):
                break
        return [], ""

    def add(self, token_id: int) -> str:
        """Appends one generated id; returns the new text it completes (possibly "")."""
        self._window.append(token_id)
        new_text = self._decode(self._window)
        if new_text.endswith(REPLACEMENT_CHAR) or len(new_text) <= len(self._read_text):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """Returns text withheld because it ended in U+FFFD; call once when generation ends."""
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._read_text):
            return ""
        return self._emit(new_text)

    def _emit(self, new_text: str) -> str:
        if not new_text.startswith(self._read_text):
            logger.debug("decoder changed earlier text: %r -> %r", self._read_text, new_text)
        piece = new_text[len(self._read_text) :]
        # The next window starts at the tokens just read, so it keeps some real text in front.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._read_text = self._decode(self._window)
        self.text += piece
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )


def _load_backend(path: Path) -> BackendTokenizer:
    """Parses tokenizer.json, with truncation and padding off (as HF's encode of one text)."""
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON or bad fields
        raise ValueError(f"cannot parse {path}: {e}") from e
    backend.no_truncation()
    backend.no_padding()
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file is absent; ValueError naming it if invalid."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"cannot parse {path}: expected a JSON object")
    return data


def _as_added_token(value: Any) -> AddedToken | None:
    """A config entry ("<s>" or {"content": "<s>", "lstrip": ...}) as a special AddedToken."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = ("single_word", "lstrip", "rstrip", "normalized")
        kwargs = {key: bool(value[key]) for key in flags if key in value}
        return AddedToken(value["content"], special=True, **kwargs)
    return None


def _is_model_specific(name: str, value: Any) -> bool:
    """HF 5 treats other `*_token` string entries (e.g. "image_token") as named special tokens."""
    is_named = name in SPECIAL_TOKEN_ATTRIBUTES
    return name.endswith("_token") and not is_named and isinstance(value, str)


def _special_tokens(
    config: dict[str, Any], path: Path
) -> tuple[dict[str, AddedToken], list[AddedToken]]:
    """(named special tokens, unnamed extra special tokens), resolved as HF 5 does from the
    config and, when it has no `added_tokens_decoder`, the legacy special_tokens_map.json."""
    legacy = {} if "added_tokens_decoder" in config else _read_json(path / SPECIAL_TOKENS_MAP_FILE)
    named_entries = {
        name: value
        for name, value in config.items()
        if name in SPECIAL_TOKEN_ATTRIBUTES or _is_model_specific(name, value)
    }
    named_entries.update({k: v for k, v in legacy.items() if k in SPECIAL_TOKEN_ATTRIBUTES})
    extra_entries = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra_entries, Mapping):  # {"image_token": "<image>"}: named, model-specific
        named_entries.update(extra_entries)
        extra_entries = []
    extra_entries = [*(extra_entries or []), *(legacy.get("additional_special_tokens") or [])]
    named = {n: tok for n, v in named_entries.items() if (tok := _as_added_token(v)) is not None}
    extra = [tok for v in extra_entries if (tok := _as_added_token(v)) is not None]
    return named, extra


_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _added_token_from_entry(entry: Mapping[str, Any]) -> AddedToken:
    """An `added_tokens_decoder` entry of tokenizer_config.json as an AddedToken."""
    flags = {key: bool(entry[key]) for key in _ADDED_TOKEN_FLAGS if key in entry}
    return AddedToken(entry["content"], **flags)


def _flags(token: AddedToken | None) -> tuple[bool, ...] | None:
    return None if token is None else tuple(getattr(token, key) for key in _ADDED_TOKEN_FLAGS)


def _as_special(token: AddedToken) -> AddedToken:
    flags = {key: getattr(token, key) for key in _ADDED_TOKEN_FLAGS}
    return AddedToken(token.content, **{**flags, "special": True})


def _apply_added_tokens(
    backend: BackendTokenizer,
    config: dict[str, Any],
    named: dict[str, AddedToken],
    extra: list[AddedToken],
) -> None:
    """Leaves the backend's added tokens as HF 5 leaves them after loading the directory:

    - tokenizer_config.json's `added_tokens_decoder` entries override tokenizer.json's flags;
    - named special tokens (bos, eos, ..., model-specific) listed there (or, without that entry,
      in tokenizer.json) become special, keeping their other flags, so `skip_special_tokens`
      drops them;
    - named or extra special tokens the tokenizer lacks are added as special tokens.
    """
    existing = {token.content: token for token in backend.get_added_tokens_decoder().values()}
    declared = dict(existing)
    if "added_tokens_decoder" in config:
        entries = config["added_tokens_decoder"].values()
        declared = {t.content: t for t in map(_added_token_from_entry, entries)}
    for token in named.values():
        if token.content in declared:
            declared[token.content] = _as_special(declared[token.content])
    changed = [t for t in declared.values() if _flags(t) != _flags(existing.get(t.content))]
    if changed:
        logger.debug("added tokens as tokenizer_config declares them: %s", changed)
        backend.add_tokens(changed)
    known = existing.keys() | declared.keys()
    missing = {t.content: t for t in [*named.values(), *extra] if t.content not in known}
    if missing:
        logger.debug("special tokens missing from tokenizer.json: %s", list(missing))
        backend.add_special_tokens(list(missing.values()))


def _ids_of(value: Any) -> list[int]:
    """An `eos_token_id` entry (int, list of ints or null) as a list."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _eos_token_ids(backend: BackendTokenizer, eos_token: str | None, path: Path) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's eos_token, and the eos_token_id entries of
    generation_config.json and config.json."""
    ids = set()
    if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
        ids.add(eos_id)
    for name in ("generation_config.json", "config.json"):
        ids.update(_ids_of(_read_json(path / name).get("eos_token_id")))
    return frozenset(ids)


def _load_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates ({} when none). As in HF, chat_template.jinja and
    additional_chat_templates/*.jinja replace tokenizer_config.json's entry; chat_template.json
    (written by processors) is the last resort. A single template is named "default"."""
    files = {}
    if (path / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    for extra in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        files[extra.stem] = extra.read_text(encoding="utf-8")
    if files:
        return files
    raw = config.get("chat_template")
    if raw is None:
        raw = _read_json(path / LEGACY_CHAT_TEMPLATE_FILE).get("chat_template")
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):  # [{"name": "default", "template": "..."}, ...]
        return {entry["name"]: entry["template"] for entry in raw}
    return {}


def _clean_up_tokenization(text: str) -> str:
    """HF's `clean_up_tokenization`: removes spaces before punctuation and contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant spans with it): renders its
    body unchanged, as HF does when it is not computing assistant masks."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` / `dict.fromkeys(...)` in templates, without exposing the dict type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (HF's sandbox hardening)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's `tojson` filter: plain json.dumps (jinja's own escapes HTML characters)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    """Compiles a chat template in HF's sandbox: same options, extensions, filters, globals."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _check_chat_inputs(messages: list[dict], tools: list[dict] | None) -> None:
    """ValueError for inputs a template cannot render (rather than a TypeError deep inside)."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    if not all(isinstance(message, Mapping) for message in messages):
        raise ValueError("chat messages must be dicts with 'role' and 'content'")
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise ValueError("tools must be JSON-schema dicts")


def _drop_none(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message without its None-valued keys (OpenAI clients send `content: null`)."""
    return {key: value for key, value in message.items() if value is not None}


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types, so templates cannot reach methods of rich objects;
    anything else becomes a placeholder naming its type (as HF does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fills `reasoning_content` and `thinking` from whichever reasoning field a message has
    (templates read different names), as HF does."""
    aliased = []
    for message in chat:
        reasoning = next(
            (message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased
