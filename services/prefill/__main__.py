"""python -m services.prefill: a prefill node (settings: prfaas/settings.py)."""

from __future__ import annotations

from prfaas.cluster import Role
from prfaas.settings import parse_node_settings
from prfaas.startup import run_service

from ..worker.run import run_node

if __name__ == "__main__":
    run_service("prefill", lambda s: run_node(s, Role.PREFILL), parse_node_settings("prefill"))
