"""Cross-datacenter link emulation (network namespaces, tc, a user-space delay proxy): an
operations and test tool beside the serving library. See netns.py."""

from tools.linkemu.netns import SIDES, EmulatedLink, Side, cleanup_stale, link_supported, read_ready_line, tbf_params
from tools.linkemu.probes import serve_delay_proxy

__all__ = ["SIDES", "EmulatedLink", "Side", "cleanup_stale", "link_supported", "read_ready_line",
           "serve_delay_proxy", "tbf_params"]
