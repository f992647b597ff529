"""The router's choice of KV wire format per transfer (formats: prfaas/transport/codec.py).

Two questions, per placement:
  - can this prefill node's KV reach this decode node at all? Their cache dtypes differ and the
    decode node does not convert: the pair is never routed (known from registration, logged once);
  - compress? Only transfers across clusters (PrfaaS prefill -> local decode), and only when the
    mode says so: "off" never, "always" always, "auto" while the link is the bottleneck:
      on  when the PrfaaS egress reaches `high_util` of the link (`on_util_scarce` in the
          bandwidth-scarce mode) or the KV connections retransmit (congestion);
      off when the egress, counted as if it were exact (measured x the compression ratio), is
          back under `low_util` and no retransmits came for `hold_s`.
The decode node says what it accepts (its registered wire formats); a compression it does not
take falls back to exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prfaas.obs.log import get_logger
from prfaas.transport.formats import choose

from .placement import Node

log = get_logger(__name__)

MODES = ("off", "auto", "always")


@dataclass(frozen=True)
class WireSettings:
    mode: str = "auto"  # off / auto / always
    compression: str = "int8"  # the compressed form used when compressing: int8 or fp8
    link_bytes_per_s: float = 10e9 / 8
    ratio: float = 3.5  # exact / compressed bytes of a transfer (from the KV layout)
    scarce: bool = False  # the bandwidth-scarce mode: compress from a lower utilisation
    high_util: float = 0.8
    on_util_scarce: float = 0.5
    low_util: float = 0.4
    congestion_retransmits_per_s: float = 20.0
    hold_s: float = 5.0


class WirePolicy:
    def __init__(self, settings: WireSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings or WireSettings()
        if self.s.mode not in MODES:
            raise ValueError(f"kv compression mode {self.s.mode!r}: choose from {', '.join(MODES)}")
        self.clock = clock
        self.compressing = self.s.mode == "always"
        self.utilisation = 0.0
        self._retx: tuple[float, int] | None = None
        self._calm_since = self.clock()
        self._refused: set[tuple[str, str]] = set()

    # --- the link ----------------------------------------------------------------------------------
    def observe(self, nodes: Sequence[Node]) -> bool:
        """Looks at the PrfaaS prefill nodes' egress and retransmits; returns whether
        cross-cluster transfers are compressed from now on."""
        if self.s.mode != "auto":
            return self.compressing
        prfaas = [n for n in nodes if n.cluster == "prfaas"]
        egress = sum(n.egress_bytes_per_s for n in prfaas)
        now = self.clock()
        retx = sum(n.kv_retransmits for n in prfaas)
        rate = 0.0
        if self._retx is not None and now > self._retx[0]:
            rate = max(0, retx - self._retx[1]) / (now - self._retx[0])
        self._retx = (now, retx)
        congested = rate >= self.s.congestion_retransmits_per_s
        self.utilisation = egress / self.s.link_bytes_per_s
        exact_util = self.utilisation * (self.s.ratio if self.compressing else 1.0)
        on_at = self.s.on_util_scarce if self.s.scarce else self.s.high_util
        if congested or exact_util >= on_at:
            self._calm_since = now
            if not self.compressing:
                log.info("kv_compression_on", utilisation=round(self.utilisation, 3), congested=congested,
                         retransmits_per_s=round(rate, 1))
            self.compressing = True
        elif self.compressing and exact_util < self.s.low_util and now - self._calm_since >= self.s.hold_s:
            log.info("kv_compression_off", utilisation=round(self.utilisation, 3))
            self.compressing = False
        elif exact_util >= self.s.low_util:
            self._calm_since = now
        return self.compressing

    # --- one placement -----------------------------------------------------------------------------
    def wire_for(self, prefill: Node, decode: Node) -> str | None:
        """The wire format of a transfer from `prefill` to `decode`; None: the pair cannot work."""
        across = prefill.cluster != decode.cluster
        comp = self.s.compression if self.compressing and across else ""
        src, dst = prefill.cache_dtype or "float32", decode.cache_dtype or "float32"
        accepted = decode.wire_dtypes or ("",)
        wire = choose(accepted, src, dst, comp)
        if wire is None and (prefill.node_id, decode.node_id) not in self._refused:
            self._refused.add((prefill.node_id, decode.node_id))
            log.warning("kv_pair_refused", prefill=prefill.node_id, decode=decode.node_id, prefill_dtype=src,
                        decode_dtype=dst, accepted=list(accepted),
                        reason="the decode node does not convert KV from the prefill node's dtype")
        return wire
