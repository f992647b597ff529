"""The front door against a running cluster, driven by the official `openai` client: the same
tokens and text as `Router.Generate` (and as transformers) for the same greedy request, stop
strings and stop tokens, usage with cached tokens, logprobs against transformers, n with a seed,
and the errors (404, 400, 401) in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import torch

from prfaas.cluster.client import CachePoolClient
from tests.frontdoor.conftest import MODEL_NAME, router_generate
from tests.test_data_path import reference, wait_all_free

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

PROMPT = "the router routes requests; the decode node"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "caf\u00e9 \u65e5\u672c?"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.cluster.frontdoor_url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_router_and_transformers(served, client, stream):
    ids = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    want = router_generate(served.cluster.router_address, ids, 12)
    assert want.token_ids == reference(served.reference, ids, 12)
    assert want.text == served.tokenizer.decode(want.token_ids), "the router's streamed text is whole"
    if stream:
        chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert not chunks[-1].choices and finish == ["length"]
    else:
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
        text, usage = r.choices[0].text, r.usage
        assert r.choices[0].finish_reason == "length" and r.model == MODEL_NAME
    assert text == want.text
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 12)
    assert usage.total_tokens == len(ids) + 12


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_router_on_the_templated_prompt(served, client, stream):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(served.model_dir))
    ids = list(hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False))
    want = router_generate(served.cluster.router_address, ids, 10)
    if stream:
        chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                                     temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
    else:
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
        text = r.choices[0].message.content
        assert r.choices[0].message.role == "assistant"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    assert text == want.text


def _unique_piece(text: str, start: int) -> tuple[int, str]:
    for i in range(start, len(text) - 3):
        piece = text[i : i + 3]
        if "\ufffd" not in piece and text.find(piece) == i:
            return i, piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(served, client, stream):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].text
    at, stop = _unique_piece(text, 6)
    kw = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop, "\x00\x01"]}
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        got = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw)
        got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens < 24
    assert (got, reason) == (text[:at], "stop")


def test_stop_token_id_ends_generation(served, client):
    ids = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    out = router_generate(served.cluster.router_address, ids, 16).token_ids
    k = out.index(out[5])
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                  extra_body={"stop_token_ids": [out[5]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == k + 1
    assert r.choices[0].text == served.tokenizer.decode(out[:k])


def test_repeated_long_prompt_reports_cached_tokens(served, client):
    grid = 2048
    prompt = torch.randint(3, 300, (grid + 40,), generator=torch.Generator().manual_seed(3)).tolist()
    block = 16  # the nodes' KV block size: the prefix cache keeps a checkpoint at the last block boundary
    cached = (len(prompt) - 1) // block * block  # before the prompt's end (docs/prefix_cache.md)
    first = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0

    async def hit() -> int:
        async with CachePoolClient(served.cluster.cachepool_address) as pool:
            for _ in range(100):
                match = await pool.match(prompt)
                if match.hits:
                    return max(h.hit_tokens for h in match.hits)
                await asyncio.sleep(0.1)
        return 0

    assert asyncio.run(hit()) == cached
    again = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == cached
    assert again.usage.prompt_tokens == grid + 40 and again.choices[0].text == first.choices[0].text


def test_logprobs_equal_transformers(served, client):
    ids = served.tokenizer.encode(PROMPT, add_special_tokens=True)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    got = r.choices[0].logprobs
    out = router_generate(served.cluster.router_address, ids, 6, logprobs=3)
    assert got.token_logprobs == pytest.approx(out.logprobs, abs=1e-6)
    with torch.inference_mode():
        logits = served.reference(torch.tensor([ids + out.token_ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(ids) - 1 : -1]
    chosen = want.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert got.token_logprobs == pytest.approx(chosen.tolist(), abs=1e-3)
    for row, top, shown in zip(want, out.top, got.top_logprobs, strict=True):
        values, ids_k = torch.topk(row, 3)
        assert [t for t, _ in top] == ids_k.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-3)
        assert {served.tokenizer.decode([t]) for t, _ in top} == set(shown)  # keyed by token text, as OpenAI's
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_n_choices_with_a_seed_are_reproducible(served, client):
    kw = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 24
    assert len({c.text for c in a.choices}) > 1, "each choice samples with its own seed"


def test_models_health_and_errors(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for bad in ({"temperature": 5}, {"top_p": 0}, {"max_tokens": 0}, {"n": 100}, {"stop": [""]},
                {"presence_penalty": 1.0}, {"prompt": [5000]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, **bad})
        assert e.value.status_code == 400 and e.value.body["message"], bad
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "tool", "content": "x"}], max_tokens=2)
    import urllib.request

    base = served.cluster.frontdoor_url.removesuffix("/v1")
    assert json.loads(urllib.request.urlopen(f"{base}/health", timeout=10).read())["status"] == "ok"


def test_api_key_is_checked(served):
    """A second front door on the same router, started with --api-key."""
    c = served.cluster
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.frontdoor", "--listen", "127.0.0.1:0", "--router", c.router_address,
         "--model", str(served.model_dir), "--served-model-name", MODEL_NAME],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**_env(), "PRFAAS_API_KEY": "s3cret"},
    )
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        url = f"http://{line['address']}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, temperature=0).usage.completion_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_client_disconnect_cancels_the_request(served):
    """A streaming client that goes away mid-stream: the router and every node free the request
    long before its 3000 tokens would have been decoded."""
    import http.client

    c = served.cluster
    host, port = c.frontdoor_url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 3:
        line = resp.readline()
        seen += line.startswith(b"data: {")
    t0 = time.monotonic()
    conn.sock.close()  # the client goes away
    conn.close()
    asyncio.run(wait_all_free(c.cachepool_address, timeout_s=15))
    assert time.monotonic() - t0 < 15
