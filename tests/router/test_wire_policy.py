"""The router's wire-format choice (services/router/wire.py): pairs, modes, and `auto` following
the measured egress and retransmits of the PrfaaS prefill nodes, with a controlled clock."""

from __future__ import annotations

import dataclasses

import pytest

from prfaas.transport.formats import accepted_formats
from services.router.placement import Node
from services.router.wire import WirePolicy, WireSettings

LINK = 1e6  # bytes per second
PREFILL = Node("prfaas-p0", "prfaas", "prefill", "a:1", cache_dtype="float32")
LOCAL_P = Node("local-p0", "local", "prefill", "b:1", cache_dtype="float32")
DECODE = Node("local-d0", "local", "decode", "c:1", cache_dtype="float32", wire_dtypes=accepted_formats())


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def at(egress: float, retransmits: int = 0) -> list[Node]:
    return [dataclasses.replace(PREFILL, egress_bytes_per_s=egress, kv_retransmits=retransmits), LOCAL_P, DECODE]


def test_modes_and_pairs():
    always = WirePolicy(WireSettings("always", "fp8", LINK))
    assert always.wire_for(PREFILL, DECODE) == "fp8"
    assert always.wire_for(LOCAL_P, DECODE) == "", "transfers inside a cluster stay exact"
    off = WirePolicy(WireSettings("off", "fp8", LINK))
    off.observe(at(10 * LINK))
    assert off.wire_for(PREFILL, DECODE) == ""
    bf16 = dataclasses.replace(PREFILL, cache_dtype="bfloat16")
    assert always.wire_for(bf16, DECODE) == "fp8+bfloat16"
    strict = dataclasses.replace(DECODE, wire_dtypes=accepted_formats(convert=False))
    assert always.wire_for(bf16, strict) is None
    old = dataclasses.replace(DECODE, wire_dtypes=())  # registered before wire formats: exact only
    assert always.wire_for(PREFILL, old) == ""
    with pytest.raises(ValueError, match="choose from"):
        WirePolicy(WireSettings("sometimes"))


def test_auto_follows_the_link():
    clock = Clock()
    w = WirePolicy(WireSettings("auto", "int8", LINK, ratio=3.0, hold_s=5.0), clock)
    assert not w.observe(at(0.5 * LINK))
    assert w.wire_for(PREFILL, DECODE) == ""
    clock.t = 1
    assert w.observe(at(0.85 * LINK)), "egress near capacity"
    assert w.wire_for(PREFILL, DECODE) == "int8"
    clock.t = 2  # compressed, the egress falls to a third, but as exact it would still fill the link
    assert w.observe(at(0.3 * LINK))
    clock.t = 3  # the demand itself fell: exact it would be 0.3 of the link; held hold_s after t=2
    assert w.observe(at(0.1 * LINK))
    clock.t = 6.9
    assert w.observe(at(0.1 * LINK))
    clock.t = 7.1
    assert not w.observe(at(0.1 * LINK)), "calm for hold_s: exact again"
    assert w.wire_for(PREFILL, DECODE) == ""


def test_auto_on_congestion_and_in_scarce_mode():
    clock = Clock()
    w = WirePolicy(WireSettings("auto", "fp8", LINK, congestion_retransmits_per_s=10), clock)
    w.observe(at(0.1 * LINK, retransmits=100))
    clock.t = 1
    assert not w.observe(at(0.1 * LINK, retransmits=105)), "5 per second is not congestion"
    clock.t = 2
    assert w.observe(at(0.1 * LINK, retransmits=200)), "95 per second is"
    scarce = WirePolicy(WireSettings("auto", "fp8", LINK, scarce=True), Clock())
    assert scarce.observe(at(0.6 * LINK)), "the bandwidth-scarce mode compresses from half the link"
    assert not WirePolicy(WireSettings("auto", "fp8", LINK), Clock()).observe(at(0.6 * LINK))
