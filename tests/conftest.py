"""The whole suite runs with mutual TLS on, as a deployment does by default: one development PKI
for the session (PRFAAS_TLS_DIR, made here unless the caller set one), which every cluster and
service the tests start uses (each process issues its own certificate there as it starts). The
test process itself calls as the `admin` identity (PRFAAS_TLS_NAME); a test that must act as
another one asks `LocalCluster.tls_as(name)` or `tests.support.tls_as(name)`.
PRFAAS_INSECURE=1 runs the suite without TLS instead."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_MADE: Path | None = None
if os.environ.get("PRFAAS_INSECURE", "").lower() not in ("1", "true", "yes", "on") and not os.environ.get(
        "PRFAAS_TLS_DIR"):
    from prfaas.security.pki import ensure_dev_pki

    _MADE = ensure_dev_pki(Path(tempfile.mkdtemp(prefix="prfaas-test-pki-")))
    os.environ["PRFAAS_TLS_DIR"] = str(_MADE)
os.environ.setdefault("PRFAAS_TLS_NAME", "admin")


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    if _MADE is not None:
        shutil.rmtree(_MADE, ignore_errors=True)
