"""python -m services.decode: a decode node (settings: prfaas/settings.py)."""

from __future__ import annotations

import asyncio

from prfaas.cluster import Role
from prfaas.settings import parse_node_settings
from services.worker.run import run_node

if __name__ == "__main__":
    asyncio.run(run_node(parse_node_settings("decode"), Role.DECODE))
