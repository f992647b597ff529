"""The `prfaas` command as a user runs it: model init, generate, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def prfaas(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prfaas.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=["qwen3_next", "kimi_linear"])
def model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    r = prfaas("model", "init", "--family", request.param, "--preset", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_dir"] == str(out)
    return out


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from prfaas.model.presets import write_preset

    return write_preset(tmp_path_factory.mktemp("q"), "qwen3_next", "tiny")


def test_generate_json_from_token_ids_and_text(model_dir):
    r = prfaas("generate", "--model", str(model_dir), "--token-ids", "1,2,3,4", "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) <= 5 and isinstance(out["text"], str)
    again = json.loads(
        prfaas("generate", "--model", str(model_dir), "--token-ids", "1,2,3,4", "--max-tokens", "5", "--json").stdout
    )
    assert again == out, "greedy is deterministic"
    r = prfaas(
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "héllo",
        "--max-tokens",
        "3",
        "--temperature",
        "0.7",
        "--seed",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--token-ids", "1,2,100000"], "outside the vocabulary"),
        (["--token-ids", "1,2", "--max-tokens", "0"], "max_tokens must be at least 1"),
        (["--prompt", ""], "prompt is empty"),
        (["--token-ids", ",".join(["5"] * 40000)], "serves at most"),
    ],
)
def test_generate_bad_input(qwen_dir, args, message):
    r = prfaas("generate", "--model", str(qwen_dir), *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_unknown_family_and_missing_tensor(tmp_path, model_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    r = prfaas("generate", "--model", str(bad), "--token-ids", "1")
    assert r.returncode == 2 and "unknown model family 'llama'" in r.stderr

    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_dir / "model.safetensors"))
    weights.pop("model.norm.weight")
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(bad / "model.safetensors"))
    r = prfaas("generate", "--model", str(bad), "--token-ids", "1")
    assert r.returncode == 2 and "missing tensor 'model.norm.weight'" in r.stderr
