"""The soak's short form (bench/soak.py --quick): at 2x capacity, with cancellations and one fault
of each kind in turn, nothing is lost and every error is explained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_soak_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--json", str(out),
                        "--keep-logs", str(logs)], cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    if result["lost"] or result["unexplained"]:  # what each unexplained one was told, and the router's failures
        failed = [line for line in (logs / "router.log").read_text().splitlines() if "attempt_failed" in line]
        pytest.fail(f"lost {result['lost']}, unexplained {result['unexplained']}: "
                    f"{json.dumps(result['unexplained_examples'])}\nfaults: {json.dumps(result['faults'])}\n"
                    + "\n".join(failed[-20:]))
    assert result["outcomes"].get("OK", 0) > 0 and len(result["faults"]) == 4
    for name, (start, end) in result["rss_mib"].items():
        assert end < 2 * start + 200, f"{name}: RSS {start} -> {end} MiB"
