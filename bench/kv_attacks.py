"""The data-plane attacks of issue 10 against a real local cluster, one run: the decode node's RSS
and open fds, and the longest gap between tokens of a request streaming meanwhile, unattacked
and under each attack (tests/kv_attacks.py has the attacks and their descriptions).

    PYTHONPATH=. python bench/kv_attacks.py                      # this checkout's services
    PYTHONPATH=/path/to/older/checkout python bench/kv_attacks.py   # "before": that checkout's services

The cluster runs the code of whichever `prfaas` is on PYTHONPATH; the attacker and the
measurements always come from this file's checkout. Prints a markdown table (preliminary on a
shared machine: the gaps include CPU contention with the attacker process).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _attacks_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("kv_attacks", HERE / "tests" / "kv_attacks.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kv_attacks"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="frame_length,conn_flood,slowloris,big_frame",
                   help="in this order (the parser bomb last: before the fix it keeps the node busy long after)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each attack runs")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--fresh", action="store_true",
                   help="a new cluster for each attack (a node an attack leaves stalled does not spoil the next)")
    a = p.parse_args(argv)

    import torch

    from prfaas.cluster.local import ClusterSpec, LocalCluster
    from prfaas.model.presets import write_preset

    ka = _attacks_module()
    root = Path(tempfile.mkdtemp(prefix="kv_attacks_"))
    model = write_preset(root / "model", "qwen3_next", "tiny", seed=5)
    # the node's read and idle timeouts shortened to 5 s (defaults 15 and 10) so that the attacks'
    # windows cover them; a checkout without these settings ignores the variables
    env = {"PRFAAS_KV_BLOCKS": "512", "PRFAAS_STATE_SLOTS": "16", "PRFAAS_KV_READ_TIMEOUT_S": "5",
           "PRFAAS_KV_IDLE_TIMEOUT_S": "5"}
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=1, local_decode=1, threshold_tokens=64, tls=False,
                       convertible_local=False, frontdoor=False, metrics=False, extra_env=env)
    prompt = torch.randint(3, 250, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    import prfaas

    print(f"services from {Path(prfaas.__file__).parents[1]}", file=sys.stderr, flush=True)
    runs: list = []  # type: ignore[type-arg]
    groups = [[k] for k in a.attacks.split(",")] if a.fresh else [a.attacks.split(",")]
    for i, kinds in enumerate(groups):
        with LocalCluster(str(model), spec, log_dir=str(root / f"logs{i}")) as c:
            target = ka.kv_port_of(root / f"logs{i}" / "local-d0.log")
            pid = c.proc("local-d0").popen.pid
            ka.measure(c.router_address, pid, target, "", prompt, a.max_tokens)  # warm up
            if not runs:
                runs.append(ka.measure(c.router_address, pid, target, "", prompt, a.max_tokens))
            for kind in kinds:
                print(f"attack {kind} ...", file=sys.stderr, flush=True)
                runs.append(ka.measure(c.router_address, pid, target, kind, prompt, a.max_tokens, a.seconds))
    base = runs[0]
    print("| attack | decode RSS MiB (start -> peak) | open fds (peak) | max token gap s | vs unattacked | "
          "same tokens | node's answers |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        same = "yes" if r.code == "OK" and r.tokens == base.tokens else f"no ({r.code})"
        ratio = r.max_gap_s / base.max_gap_s if base.max_gap_s else 0.0
        print(f"| {r.attack} | {r.rss_before_mib:.0f} -> {r.rss_peak_mib:.0f} | {r.fds_peak} | {r.max_gap_s:.2f} | "
              f"{ratio:.1f}x | {same} | {r.answers or ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
