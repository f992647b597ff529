"""The training corpus, the tokenizer and `prfaas model train` end to end, on small copies of
standard-library files (the full run is scripts/train_models.py, docs/models.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prfaas.training.corpus import is_heldout, stdlib_corpus, stdlib_root
from prfaas.training.tokenizer import SPECIAL_TOKENS, train_tokenizer

SOURCES = ["argparse.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py",
           "operator.py", "json/decoder.py", "json/encoder.py", "json/__init__.py"]


@pytest.fixture(scope="module")
def mini_stdlib(tmp_path_factory) -> Path:
    """A few real standard-library files, plus the kinds the corpus leaves out."""
    root = tmp_path_factory.mktemp("stdlib")
    for rel in SOURCES:
        src = stdlib_root() / rel
        if not src.is_file():
            pytest.skip(f"this Python has no {rel}")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / rel)
    for rel in ["site-packages/pkg/mod.py", "test/test_x.py", "encodings/cp999.py", "_sysconfigdata_x.py",
                "config-3.11-x86_64-linux-gnu/python-config.py", "empty.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("" if rel == "empty.py" else "x = 1\n")
    return root


def test_corpus_files_split_and_exclusions(mini_stdlib):
    c = stdlib_corpus(mini_stdlib)
    files = c.train + c.heldout
    assert sorted(files) == sorted(SOURCES)
    assert list(c.train) == sorted(c.train) and not set(c.train) & set(c.heldout)
    assert all(is_heldout(f) for f in c.heldout) and not any(is_heldout(f) for f in c.train)
    assert c.texts("train")[0] == (mini_stdlib / c.train[0]).read_text()
    with pytest.raises(ValueError, match="unknown split"):
        c.texts("validation")


def test_the_real_stdlib_holds_out_about_one_file_in_twenty():
    c = stdlib_corpus()
    assert len(c.train) > 100
    assert 0.02 < len(c.heldout) / (len(c.train) + len(c.heldout)) < 0.09


def test_corpus_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no standard library"):
        stdlib_corpus(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no Python sources"):
        stdlib_corpus(tmp_path)


def test_tokenizer_is_deterministic_lossless_and_keeps_special_ids(mini_stdlib):
    texts = stdlib_corpus(mini_stdlib).texts("train")
    a, b = train_tokenizer(texts, 600), train_tokenizer(texts, 600)
    assert a.to_str() == b.to_str(), "same texts, same tokenizer"
    assert [a.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    text = "def f(x):\n    return 'héllo ✓'  # ünïcode\n\t\n"
    assert a.decode(a.encode(text).ids) == text
    assert a.encode("<|endoftext|>").ids == [0]
    with pytest.raises(ValueError, match="no room"):
        train_tokenizer(texts, 200)


def test_model_train_command_writes_a_loadable_checkpoint(mini_stdlib, tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "prfaas.cli", "model", "train", "--family", "qwen3_next", "--out", str(out),
           "--steps", "3", "--batch", "2", "--seq-len", "32", "--threads", "1", "--stdlib", str(mini_stdlib)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "step 3/3" in r.stderr and "tok/s" in r.stderr and "eta" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["model_dir"] == str(out) and summary["heldout_perplexity"] > 1
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "training_report.json"]:
        assert (out / name).is_file(), name
    report = json.loads((out / "training_report.json").read_text())
    assert report["train_tokens"] == 3 * 2 * 32 and report["recipe"]["steps"] == 3
    assert isinstance(report["sample"], str)
    from prfaas.model.loader import load_model

    assert load_model(out).config.family == "qwen3_next"
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "absent")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no standard library" in bad.stderr
