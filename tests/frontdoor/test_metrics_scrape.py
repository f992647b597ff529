"""Every process of a running cluster exports its role's metric families (prfaas/obs/metrics.py,
docs/metrics.md) and nothing else; after traffic, the families that traffic moves have moved.
The expositions are parsed with prometheus_client's parser and, where Debian's prometheus package
installed promtool, checked by `promtool check metrics`.

Families not wired yet are listed in NOT_WIRED with who wires them; each must still be exported,
and the test fails once one of them moves, so that the list stays true."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from prfaas.obs.metrics import FAMILIES, Family
from tests.frontdoor.conftest import MODEL_NAME

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

# process -> its roles (local nodes start convertible: prefill and decode)
ROLES = {
    "frontdoor": {"frontdoor"},
    "router": {"router"},
    "cachepool": {"cachepool"},
    "prfaas-p0": {"prefill"},
    "local-p0": {"prefill", "decode"},
    "local-d0": {"prefill", "decode"},
}
# (process, family attr) -> who wires it, and where (the hook points are in docs/metrics.md)
NOT_WIRED: dict[tuple[str, str], str] = {}  # every family is wired
_FRONT = {f.attr for f in FAMILIES if "frontdoor" in f.roles} - {"running"}
_PREFILL_WORK = {"queue_time", "prefix_queries", "prompt_computed", "kv_bytes", "kv_transfer_seconds"}
# what the traffic below must have moved, per process (live gauges that are 0 again at rest are
# read during a request instead: see _scrape_during_a_long_stream)
EXPECT_MOVED = {
    "frontdoor": _FRONT,
    "router": {"ttft", "prefix_queries", "prefix_hits", "threshold", "routing_decisions", "e2e", "queue_time",
               "prompt_tokens", "generation_tokens", "request_success"},
    "cachepool": {"cluster_nodes", "cache_events"},
    # the PrfaaS node keeps the long prompt's prefix: blocks and a state checkpoint stay in use
    "prfaas-p0": _PREFILL_WORK | {"prefix_hits", "kv_usage", "state_usage"},
    "local-p0": _PREFILL_WORK,
    "local-d0": {"itl", "generation_tokens", "kv_received_bytes"},
}


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def parsed(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def moved(f: Family, samples: list) -> bool:
    if f.kind == "counter":
        return any(s.name.endswith("_total") and s.value > 0 for s in samples)
    if f.kind == "histogram":
        return any(s.name.endswith("_count") and s.value > 0 for s in samples)
    return any(s.value > 0 for s in samples)


def _traffic(served) -> None:
    client = openai.OpenAI(base_url=served.cluster.frontdoor_url, api_key="x", max_retries=0, timeout=120)
    client.completions.create(model=MODEL_NAME, prompt="short", max_tokens=4, temperature=0)
    long = torch.randint(3, 300, (2048 + 24,), generator=torch.Generator().manual_seed(11)).tolist()
    for _ in range(2):  # the second hits the prefix the first left on its PrfaaS node
        list(client.completions.create(model=MODEL_NAME, prompt=long, max_tokens=6, temperature=0, stream=True))
        time.sleep(1.0)  # the prefix events reach the pool
    list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=5, stream=True))


def test_every_process_exports_its_roles_families(served):
    urls = served.cluster.metrics_urls
    assert set(urls) == set(ROLES), urls
    in_flight = _scrape_during_a_long_stream(served)
    _traffic(served)
    time.sleep(2.5)  # one control-loop tick: the router sets the link utilisation
    problems: list[str] = []
    for proc, url in urls.items():
        text = scrape(url)
        _promtool(proc, text)
        fams = parsed(text)
        mine = [f for f in FAMILIES if ROLES[proc] & set(f.roles)]
        extra = {n for n in fams if n.startswith("prfaas_")} - {f.name for f in mine}
        if extra:
            problems.append(f"{proc} exports families of other roles: {sorted(extra)}")
        for f in mine:
            if f.name not in fams:
                problems.append(f"{proc}: {f.name} missing")
            elif (proc, f.attr) in NOT_WIRED:
                if moved(f, fams[f.name]):
                    problems.append(f"{proc}: {f.name} moves now: take it out of NOT_WIRED")
            elif f.attr in EXPECT_MOVED[proc] and not moved(f, fams[f.name]):
                problems.append(f"{proc}: {f.name} did not move with traffic")
    for proc, attr in (("frontdoor", "running"), ("local-d0", "running"), ("router", "running")):
        if in_flight[proc].get(attr, 0) < 1:
            problems.append(f"{proc}: {attr} was {in_flight[proc].get(attr)} during a request")
    assert not problems, "\n".join(problems)
    router = parsed(scrape(urls["router"]))
    assert any(s.labels == {"link": "prfaas->local"} for s in router["prfaas_link_utilisation"])
    capacity = router["prfaas_link_capacity_bytes_per_second"]
    assert any(s.labels == {"link": "prfaas->local"} and s.value > 0 for s in capacity)
    pool = parsed(scrape(urls["cachepool"]))
    assert sum(s.value for s in pool["prfaas_cluster_nodes"]) == 3


def _scrape_during_a_long_stream(served) -> dict[str, dict[str, float]]:
    """The live gauges, read while one request decodes 200 tokens."""
    client = openai.OpenAI(base_url=served.cluster.frontdoor_url, api_key="x", max_retries=0, timeout=120)
    stream = client.completions.create(model=MODEL_NAME, prompt="a long one", max_tokens=200, temperature=0,
                                       stream=True)
    seen: dict[str, dict[str, float]] = {}
    first = next(iter(stream))
    assert first.choices

    def read() -> None:
        for proc in ("frontdoor", "local-d0", "router"):
            fams = parsed(scrape(served.cluster.metrics_urls[proc]))
            seen[proc] = {"running": sum(s.value for s in fams["prfaas_num_requests_running"])}

    t = threading.Thread(target=read)
    t.start()
    t.join(30)
    for _ in stream:
        pass
    return seen


def _promtool(proc: str, text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # Debian's prometheus package is not installed here (.ci/run installs it where it can)
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"promtool on {proc}'s metrics: {out.stdout}{out.stderr}"
