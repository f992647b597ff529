"""python -m services.decode: a decode node (settings: prfaas/settings.py)."""

from __future__ import annotations

from prfaas.cluster import Role
from prfaas.settings import parse_node_settings
from prfaas.startup import run_service

from ..worker.run import run_node

if __name__ == "__main__":
    run_service("decode", lambda s: run_node(s, Role.DECODE), parse_node_settings("decode"))
