"""Model-directory files for the tests: a real byte-level BPE tokenizer.json trained here with the
`tokenizers` package (multi-byte characters span several tokens), a tokenizer_config.json with a
ChatML chat template, and a generation_config.json; and a tiktoken.model for the tiktoken path."""

from __future__ import annotations

import base64
import json
from pathlib import Path

CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "prefill as a service streams the kv cache across datacenters",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u65e5\u672c\u8a9e \u4e2d\u6587 emoji \U0001f600 ok",
    "the router routes requests; the decode node decodes tokens",
] * 8


def write_tokenizer(model_dir: Path, vocab_size: int = 300, chat_template: str | None = CHATML) -> Path:
    """tokenizer.json (ByteLevel BPE of `vocab_size` ids), tokenizer_config.json and
    generation_config.json into `model_dir`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


def write_tiktoken(model_dir: Path, added: dict[int, str] | None = None) -> Path:
    """tiktoken.model: every byte, then a few merges of the corpus's common pairs, each rank on a
    line as tiktoken writes them; tokenizer_config.json names the special tokens past them."""
    ranks: list[bytes] = [bytes([b]) for b in range(256)]
    for word in (b"th", b"he", b"the", b"in", b"er", b" t", b" the", b"\xe6\x97", b"\xe6\x97\xa5"):
        ranks.append(word)
    model_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(ranks)]
    (model_dir / "tiktoken.model").write_text("\n".join(lines) + "\n")
    added = added or {len(ranks): "[BOS]", len(ranks) + 1: "[EOS]", len(ranks) + 2: "<|im_end|>"}
    config = {"added_tokens_decoder": {str(i): {"content": c, "special": True} for i, c in added.items()},
              "bos_token": "[BOS]", "eos_token": "[EOS]"}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir
