"""Chat templates and generation defaults from a model directory, read as transformers reads them.

The template is `chat_template.jinja` when the directory has one, else `tokenizer_config.json`'s
`chat_template` (a string, or a list of named templates of which "default" is used). It renders in a
sandboxed jinja2 environment set up as transformers sets it up (`trim_blocks`, `lstrip_blocks`,
loop controls, a `{% generation %}` block that renders its body, the `tojson` filter without ASCII
escaping, the globals `raise_exception` and `strftime_now`), with `messages`, `add_generation_prompt`,
`tools`, `documents`, the special tokens (`bos_token`, `eos_token`, ...) and any extra keyword
arguments a request passes (`chat_template_kwargs`).

`generation_config.json` gives the defaults a request does not set (as vLLM's `--generation-config
auto` does): temperature, top_p, top_k, max_new_tokens and the eos ids generation stops at.
`do_sample` is not read (vLLM does not either): a default temperature of 0 is what makes greedy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from prfaas.engine.tokenizer import TokenizerError, read_json, special_tokens


class ChatTemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed to render them."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens with
    it for training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.tokens = dict(tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"the chat template does not compile: {e}") from e

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (the special tokens are in it as text)."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=documents,
                **{**self.tokens, **kwargs},
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The directory's chat template, or None when it ships none."""
    d = Path(model_dir)
    jinja_file = d / "chat_template.jinja"
    source: Any = None
    if jinja_file.is_file():
        source = jinja_file.read_text()
    elif (d / "tokenizer_config.json").is_file():
        source = read_json(d / "tokenizer_config.json").get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise TokenizerError(f"{d}: chat_template must be a string or a list of named templates")
    return ChatTemplate(source, special_tokens(d))


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> GenerationDefaults:
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        raw = read_json(path)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            return cls(
                _opt(raw, "temperature", float),
                _opt(raw, "top_p", float),
                _opt(raw, "top_k", int),
                _opt(raw, "max_new_tokens", int),
                tuple(int(i) for i in eos_ids),
            )
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"{path}: {e}") from e


def _opt(raw: dict[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    return None if value is None else kind(value)


@dataclass
class ModelFiles:
    """What the front door reads from a model directory besides the weights."""

    model_dir: Path

    @cached_property
    def chat_template(self) -> ChatTemplate | None:
        return load_chat_template(self.model_dir)

    @cached_property
    def generation(self) -> GenerationDefaults:
        return GenerationDefaults.from_dir(self.model_dir)
