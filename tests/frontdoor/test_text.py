"""Model-directory text handling with real tokenizers: loading (tokenizer.json, tiktoken.model,
loud errors), incremental detokenisation of multi-byte characters, stop strings across messages,
chat templates against transformers' own rendering, generation_config defaults, and the request
checks of the OpenAI protocol."""

from __future__ import annotations

import json

import pytest

from prfaas.engine.chat_template import ChatTemplateError, GenerationDefaults, load_chat_template
from prfaas.engine.tokenizer import (
    ByteTokenizer,
    IncrementalDetokenizer,
    TiktokenTokenizer,
    TokenizerError,
    load_tokenizer,
)
from services.frontdoor import protocol
from services.frontdoor.core import ChoiceText
from tests.frontdoor.model_files import write_tiktoken, write_tokenizer

MULTIBYTE = "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 na\u00efve"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return load_tokenizer(bpe_dir, 300)


def test_multibyte_characters_span_tokens_and_stream_whole(bpe):
    ids = bpe.encode(MULTIBYTE)
    pieces = [bpe.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs a character split across tokens"
    detok = IncrementalDetokenizer(bpe)
    streamed = [detok.push([i]) for i in ids]  # one token per message, as the decode node sends them
    streamed.append(detok.finish())
    assert "".join(streamed) == MULTIBYTE == bpe.decode(ids)
    assert not any("\ufffd" in s for s in streamed)


def test_router_text_per_message_is_whole_characters(bpe):
    """The router's streamed `text` field (services/router/core.py) decodes incrementally."""
    from services.router.core import _Text

    ids = bpe.encode(MULTIBYTE)
    text = _Text(bpe)
    out = [text.push([i], None) for i in ids[:-1]] + [text.push(ids[-1:], "length")]
    assert "".join(out) == MULTIBYTE and not any("\ufffd" in s for s in out)


def test_stream_ending_inside_a_character_flushes_a_replacement(bpe):
    ids = bpe.encode("\u65e5")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(bpe)
    assert detok.push(ids[:1]) == ""
    assert detok.finish() == "\ufffd"


@pytest.mark.parametrize("stop", ["quick br", "\u672c\u8a9e", "o"])
def test_stop_string_across_messages_ends_text_before_it(bpe, stop):
    text = "hello the quick brown \u65e5\u672c\u8a9e fox"
    ids = bpe.encode(text)
    choice = ChoiceText(bpe, (stop, "never-there"))
    out, stopped = "", False
    for i, tok in enumerate(ids):
        delta, stopped = choice.push([tok], i == len(ids) - 1)
        out += delta
        if stopped:
            break
    assert stopped and out == text[: text.index(stop)]


def test_no_stop_string_emits_everything(bpe):
    ids = bpe.encode("hello world")
    choice = ChoiceText(bpe, ("zzz",))
    out = "".join(choice.push([t], i == len(ids) - 1)[0] for i, t in enumerate(ids))
    assert out == "hello world"


def test_chat_template_renders_as_transformers_does(bpe_dir, bpe):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    template = load_chat_template(bpe_dir)
    assert template is not None
    for messages in (
        [{"role": "user", "content": "hi \u00e9"}],
        [{"role": "system", "content": "  be brief "}, {"role": "user", "content": "x"},
         {"role": "assistant", "content": "y"}, {"role": "user", "content": "\u65e5\u672c"}],
    ):
        for gen in (True, False):
            ours = template.render(messages, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert bpe.encode(ours) == list(ids)
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        template.render([{"role": "tool", "content": "x"}])


def test_chat_template_file_and_named_templates(tmp_path):
    d = write_tokenizer(tmp_path / "a", chat_template=None)
    assert load_chat_template(d) is None
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}{{ eos_token }}")
    assert load_chat_template(d).render([{"role": "user", "content": "q"}]) == "[q]<|im_end|>"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "D{{ messages|length }}"}, {"name": "rag", "template": "R"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink()
    assert load_chat_template(d).render([{"role": "user", "content": "q"}]) == "D1"


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64, "eos_token_id": [2, 7]})
    )
    g = GenerationDefaults.from_dir(tmp_path)
    assert (g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.eos_token_ids) == (0.6, 0.95, 20, 64, (2, 7))
    assert GenerationDefaults.from_dir(tmp_path / "none") == GenerationDefaults()


def test_tiktoken_directory_loads_with_its_special_tokens(tmp_path):
    pytest.importorskip("tiktoken")
    d = write_tiktoken(tmp_path)
    tok = load_tokenizer(d, 600)
    assert isinstance(tok, TiktokenTokenizer)
    ids = tok.encode("the \u65e5\u672c<|im_end|>")
    base = 256 + 9  # the bytes and the merges written
    assert ids[-1] == base + 2, "special tokens in the text are parsed"
    assert ids[0] == 258 and tok.decode(ids) == "the \u65e5\u672c"  # "the" is one merge; specials not shown
    detok = IncrementalDetokenizer(tok)
    assert "".join([detok.push([i]) for i in ids] + [detok.finish()]) == "the \u65e5\u672c"


def test_a_directory_with_an_unreadable_tokenizer_is_an_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="failed to load"):
        load_tokenizer(tmp_path, 300)
    other = tmp_path / "sp"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(other, 300)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert isinstance(load_tokenizer(bare, 300), ByteTokenizer)  # ships no tokenizer: bytes, logged


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 1000}, "n"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_bad_parameters_name_the_field(body, param):
    body = {"model": "m", **body}
    with pytest.raises(protocol.BadRequest) as e:
        protocol.prepare("completion", body, [[1]], protocol.completion_logprobs(body), protocol.Defaults())
    assert e.value.param == param and e.value.status == 400


def test_defaults_and_eos_ids_apply():
    d = protocol.Defaults(max_tokens=64, temperature=0.6, top_p=0.9, top_k=20, eos_token_ids=(7,))
    p = protocol.prepare("chat", {"model": "m", "stop_token_ids": [5]}, [[1, 2]], None, d)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop_token_ids) == (64, 0.6, 0.9, 20, (5, 7))
    p = protocol.prepare("chat", {"model": "m", "max_completion_tokens": 3, "top_k": -1}, [[1]], None, d)
    assert p.max_tokens == 3 and p.top_k == 0
    assert protocol.chat_logprobs({"logprobs": True, "top_logprobs": 3}) == 3
    with pytest.raises(protocol.BadRequest):
        protocol.chat_logprobs({"top_logprobs": 3})


def test_sampling_values_survive_the_wire():
    from prfaas.messages import SamplingParams
    from prfaas.rpc.convert import sampling_from_pb, sampling_to_pb

    for p in (SamplingParams(), SamplingParams(8, 0.5, 0.75, 5, 3, (1, 2), True, 4), SamplingParams(logprobs=0)):
        assert sampling_from_pb(sampling_to_pb(p)) == p


def test_ignore_eos_drops_the_generation_config_eos():
    d = protocol.Defaults(eos_token_ids=(7,))
    p = protocol.prepare("completion", {"model": "m", "ignore_eos": True, "stop_token_ids": [5]}, [[1]], None, d)
    assert p.ignore_eos and p.stop_token_ids == (5,)
