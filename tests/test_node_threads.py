"""The node options of this file's kind reach the live path: `--threads` sets torch's intra-op
threads when the node builds its executor, `--push-after-tokens` reaches the prefill core, a
thread count past the bound is one clear error, and `LocalCluster` gives each of its nodes a
share of the cores unless the environment already says how many threads to use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prfaas.cluster import Role
from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.settings import parse_node_settings
from services.worker.node import WorkerNode


def test_threads_and_push_after_reach_the_node(monkeypatch):
    monkeypatch.delenv("PRFAAS_THREADS", raising=False)
    before = torch.get_num_threads()
    want = 2 if before != 2 else 3
    s = parse_node_settings("prefill", ["--cachepool", "127.0.0.1:1", "--model", "builtin:qwen3_next-tiny",
                                        "--threads", str(want), "--push-after-tokens", "7"])
    try:
        node = WorkerNode(s, Role.PREFILL)
        assert torch.get_num_threads() == want
        assert node.prefill is not None and node.prefill.push_after_tokens == 7
    finally:
        torch.set_num_threads(before)
    assert parse_node_settings("prefill", ["--cachepool", "x:1"]).threads == 0, "default: torch's own"


@pytest.mark.parametrize("value", ["5000", "-1", "two"])
def test_a_bad_thread_count_is_one_clear_error(value):
    code = "from prfaas.settings import parse_node_settings; parse_node_settings('prefill', ['--cachepool', 'x:1'])"
    r = subprocess.run([sys.executable, "-c", code], env={"PRFAAS_THREADS": value, "PATH": ""},
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "PRFAAS_THREADS" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_local_cluster_splits_the_cores(monkeypatch, tmp_path):
    import os

    for var in ("PRFAAS_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    cores = len(os.sched_getaffinity(0))
    c = LocalCluster("builtin:qwen3_next-tiny", ClusterSpec(), log_dir=tmp_path)
    assert c._threads_env(4) == {"PRFAAS_THREADS": str(max(1, cores // 4))}
    assert c._threads_env(1) == {"PRFAAS_THREADS": str(cores)}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert c._threads_env(4) == {}, "the environment's own setting stands"
    monkeypatch.delenv("OMP_NUM_THREADS")
    given = LocalCluster("builtin:qwen3_next-tiny", ClusterSpec(extra_env={"PRFAAS_THREADS": "2"}), log_dir=tmp_path)
    assert given._threads_env(4) == {}
