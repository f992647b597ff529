"""python -m services.prefill: a prefill node (local PD-P or PrfaaS)."""

from __future__ import annotations

import asyncio

from prfaas.cluster import Role
from prfaas.settings import parse_node_settings
from services.common.node import run_node

if __name__ == "__main__":
    asyncio.run(run_node(parse_node_settings("prefill"), Role.PREFILL))
