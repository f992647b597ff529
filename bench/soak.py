"""A bounded soak of the real services at 2-4x their capacity, with random client cancellations and
one injected fault of each kind in turn: a stalled (SIGSTOPped) prefill node, a killed prefill node,
a killed decode node, a killed cache pool (each restarted after a while).

    .venv/bin/python bench/soak.py [--seconds 180] [--load 3] [--quick] [--plot docs/img/soak.png]

Capacity is measured first (a closed loop at twice the decode slots); then requests arrive open
loop (Poisson) at `--load` times it. Every request ends one way or another: completed, cancelled
by its client, or refused with a status; a request with no answer within its deadline is lost.
Refusals are explained when they are the queue's (RESOURCE_EXHAUSTED) or a cut stream during a
fault (UNAVAILABLE "... failed after N tokens"); anything else is unexplained. Printed: the
outcomes, P50/P99 TTFT and TPOT, queue time, every service's RSS at start and end. Goal: 0 lost,
0 unexplained errors, bounded memory. Results: docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prfaas.cluster.local import ClusterSpec, LocalCluster  # noqa: E402
from tests.support import stream  # noqa: E402

SLOTS = 16
SPEC = ClusterSpec(
    prfaas_prefill=2, local_prefill=1, local_decode=1, threshold_tokens=256,
    extra_env={"PRFAAS_KV_BLOCKS": "1024", "PRFAAS_STATE_SLOTS": str(SLOTS), "PRFAAS_MAX_BATCH": str(SLOTS),
               "PRFAAS_HEARTBEAT_TIMEOUT_S": "6"},
    router_env={"PRFAAS_STALL_TIMEOUT_S": "3", "PRFAAS_CONTROL_INTERVAL_S": "1", "PRFAAS_REFRESH_S": "0.2",
                "PRFAAS_MAX_QUEUE": "256", "PRFAAS_MAX_QUEUE_WAIT_S": "60"},
)
FAULTS = ("stall prefill", "kill prefill", "kill decode", "kill cache pool")


@dataclass
class Outcome:
    t: float  # arrival, s from the start of the soak
    prompt: int
    code: str  # "OK", "CANCELLED" (by its client), a status name, or "LOST"
    details: str = ""
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    tokens: int = 0


def prompt_len(rng: random.Random) -> int:
    return int(min(max(rng.lognormvariate(4.5, 1.0), 8), 1500))


async def one(c: LocalCluster, rng: random.Random, t0: float, cancel_p: float, deadline_s: float) -> Outcome:
    n = prompt_len(rng)
    prompt = [rng.randrange(3, 250) for _ in range(n)]
    max_tokens = rng.randrange(16, 64)
    out = Outcome(time.monotonic() - t0, n, "OK")
    call = asyncio.ensure_future(stream(c.router_address, timeout_s=deadline_s, token_ids=prompt,
                                        max_tokens=max_tokens))
    cancel_after = rng.uniform(0.05, 2.0) if rng.random() < cancel_p else None
    done, _ = await asyncio.wait({call}, timeout=cancel_after)
    if not done:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        out.code = "CANCELLED"
        return out
    r = call.result()
    out.code, out.details, out.tokens = r.code, r.details, len(r.tokens)
    if r.code == "DEADLINE_EXCEEDED":
        out.code = "LOST"
    if r.code == "OK" and r.tokens:
        out.ttft_s = r.first_at
        out.tpot_s = (r.done_at - r.first_at) / max(len(r.tokens) - 1, 1)
    return out


async def calibrate(c: LocalCluster, seconds: float) -> float:
    """Completed requests per second with twice the decode slots in flight."""
    rng, t0, done = random.Random(1), time.monotonic(), 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() - t0 < seconds:
            o = await one(c, rng, t0, 0.0, 60.0)
            done += o.code == "OK"

    await asyncio.gather(*(worker() for _ in range(2 * SLOTS)))
    return done / (time.monotonic() - t0)


class Faults:
    """One fault of each kind in turn, each healed after `hold_s`."""

    def __init__(self, c: LocalCluster, seconds: float, hold_s: float) -> None:
        self.c, self.hold_s = c, hold_s
        self.at = [seconds * (i + 1) / (len(FAULTS) + 1) for i in range(len(FAULTS))]
        self.windows: list[tuple[str, float, float]] = []

    async def run(self, t0: float) -> None:
        for what, at in zip(FAULTS, self.at, strict=True):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            start = time.monotonic() - t0
            print(f"[soak] {start:6.1f} s: {what}", flush=True)
            name = {"stall prefill": "prfaas-p0", "kill prefill": "prfaas-p1", "kill decode": "local-d0",
                    "kill cache pool": "cachepool"}[what]
            proc = self.c.proc(name).popen
            os.kill(proc.pid, signal.SIGSTOP if what.startswith("stall") else signal.SIGKILL)
            await asyncio.sleep(self.hold_s)
            if what.startswith("stall"):
                os.kill(proc.pid, signal.SIGCONT)
            else:
                proc.wait()
                await asyncio.to_thread(self.c.restart, name)
            self.windows.append((what, start, time.monotonic() - t0))


def rss_mib(c: LocalCluster) -> dict[str, float]:
    out = {}
    for p in c.procs:
        try:
            text = Path(f"/proc/{p.popen.pid}/status").read_text()
        except OSError:
            continue
        kb = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:")), 0)
        out[p.name] = kb / 1024
    return out


async def soak(c: LocalCluster, seconds: float, rate: float, cancel_p: float, hold_s: float, seed: int
               ) -> tuple[list[Outcome], Faults, list[tuple[float, dict[str, float]]]]:
    """Arrivals for `seconds`, or until every fault has healed and 10 s more have passed."""
    rng, t0 = random.Random(seed), time.monotonic()
    faults, rss = Faults(c, seconds, hold_s), [(0.0, rss_mib(c))]
    fault_task = asyncio.ensure_future(faults.run(t0))

    async def sample() -> None:
        while True:
            await asyncio.sleep(2.0)
            rss.append((time.monotonic() - t0, rss_mib(c)))

    sampler = asyncio.ensure_future(sample())
    calls: list[asyncio.Task[Outcome]] = []
    healed_at: float | None = None
    while (now := time.monotonic() - t0) < seconds or healed_at is None or now < healed_at + 10:
        if healed_at is None and fault_task.done():
            healed_at = now
        calls.append(asyncio.ensure_future(one(c, random.Random(rng.random()), t0, cancel_p, 150.0)))
        await asyncio.sleep(rng.expovariate(rate))
    await fault_task
    outcomes = await asyncio.gather(*calls)
    sampler.cancel()
    rss.append((time.monotonic() - t0, rss_mib(c)))
    return outcomes, faults, rss


def explained(o: Outcome, faults: Faults) -> bool:
    if o.code in ("OK", "CANCELLED", "RESOURCE_EXHAUSTED"):
        return True
    if o.code == "UNAVAILABLE":  # a stream cut by a fault, or placed by nobody during one
        near = any(start - 5 <= o.t <= end + 30 for _, start, end in faults.windows)
        return near and ("failed after" in o.details or "within" in o.details)
    return False


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def queue_times(log: Path) -> list[tuple[float, float]]:
    """(wall time, queue ms) of every first token the router logged."""
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("event") == "first_token":
            out.append((msg.get("timestamp", ""), float(msg.get("queue_ms", 0.0))))
    return out  # type: ignore[return-value]


def report(outcomes: list[Outcome], faults: Faults, rss: list[tuple[float, dict[str, float]]],
           queue_ms: list[float], capacity: float, rate: float) -> dict[str, object]:
    by_code: dict[str, int] = {}
    for o in outcomes:
        by_code[o.code] = by_code.get(o.code, 0) + 1
    ok = [o for o in outcomes if o.code == "OK"]
    unexplained = [o for o in outcomes if not explained(o, faults)]
    start, end = rss[0][1], rss[-1][1]
    return {
        "capacity_rps": round(capacity, 2), "offered_rps": round(rate, 2), "requests": len(outcomes),
        "outcomes": by_code, "lost": by_code.get("LOST", 0), "unexplained": len(unexplained),
        "unexplained_examples": [asdict(o) for o in unexplained[:5]],
        "ttft_p50_s": round(pct([o.ttft_s for o in ok], 50), 3),
        "ttft_p99_s": round(pct([o.ttft_s for o in ok], 99), 3),
        "tpot_p50_ms": round(1000 * pct([o.tpot_s for o in ok], 50), 2),
        "tpot_p99_ms": round(1000 * pct([o.tpot_s for o in ok], 99), 2),
        "queue_p50_ms": round(pct(queue_ms, 50), 1), "queue_p99_ms": round(pct(queue_ms, 99), 1),
        "rss_mib": {name: [round(start.get(name, float("nan"))), round(end.get(name, float("nan")))] for name in end},
        "faults": [{"fault": w, "from_s": round(a, 1), "to_s": round(b, 1)} for w, a, b in faults.windows],
    }


def plot(outcomes: list[Outcome], faults: Faults, rss: list[tuple[float, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max((o.t for o in outcomes), default=1.0)
    bins = [i * 5.0 for i in range(int(end // 5) + 2)]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for code, color in (("OK", "tab:green"), ("RESOURCE_EXHAUSTED", "tab:orange"), ("CANCELLED", "tab:gray"),
                        ("UNAVAILABLE", "tab:red")):
        xs = [o.t for o in outcomes if o.code == code]
        a.hist(xs, bins=bins, histtype="step", label=code, color=color)
    a.set_ylabel("requests / 5 s (by arrival)")
    a.legend(fontsize=8)
    ok = sorted((o.t, o.ttft_s) for o in outcomes if o.code == "OK")
    b.scatter([t for t, _ in ok], [v for _, v in ok], s=3, color="tab:blue")
    b.set_ylabel("TTFT (s)")
    b.set_yscale("log")
    for name in rss[-1][1]:
        c.plot([t for t, r in rss], [r.get(name, float("nan")) for _, r in rss], label=name)
    c.set_ylabel("RSS (MiB)")
    c.set_xlabel("time (s)")
    c.legend(fontsize=7, ncol=3)
    for ax in (a, b, c):
        for _what, s, e in faults.windows:
            ax.axvspan(s, e, color="tab:red", alpha=0.12)
    for what, s, _ in faults.windows:
        a.text(s, a.get_ylim()[1] * 0.9, what, fontsize=7, rotation=90, va="top")
    fig.suptitle("soak: outcomes, TTFT and memory over time (faults shaded)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:qwen3_next-tiny")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--load", type=float, default=None,
                    help="arrival rate as a multiple of the measured capacity (default 3; --quick: 2)")
    ap.add_argument("--cancel", type=float, default=0.2, help="fraction of requests their client cancels")
    ap.add_argument("--hold-s", type=float, default=8.0, help="how long each fault lasts")
    ap.add_argument("--quick", action="store_true",
                    help="a short form (CI): 40 s at 2x, faults of 4 s (3x left twice the backlog to drain)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-logs", type=Path, default=None,
                    help="write the services' logs here (default: a temporary directory)")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.hold_s = 40.0, 4.0
    if a.load is None:
        a.load = 2.0 if a.quick else 3.0
    with tempfile.TemporaryDirectory() as tmp:
        logs = str(a.keep_logs or tmp)
        print("[soak] starting the cluster ...", flush=True)
        with LocalCluster(a.model, SPEC, log_dir=logs) as c:
            from prfaas.security import tls

            tls.install(c.tls_as("admin"))  # mutual TLS, as every cluster runs by default
            capacity = asyncio.run(calibrate(c, 6.0 if a.quick else 15.0))
            rate = a.load * capacity
            print(f"[soak] capacity {capacity:.1f} req/s; offering {rate:.1f} req/s for {a.seconds:.0f} s", flush=True)
            outcomes, faults, rss = asyncio.run(soak(c, a.seconds, rate, a.cancel, a.hold_s, a.seed))
            queue_ms = [q for _, q in queue_times(Path(logs) / "router.log")]
    result = report(outcomes, faults, rss, queue_ms, capacity, rate)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    if a.plot:
        plot(outcomes, faults, rss, a.plot)
        print(f"[soak] plot: {a.plot}")
    return 0 if result["lost"] == 0 and result["unexplained"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
