"""Accelerator profile emulation inside a worker node.

This machine cannot be an H200 and an H20. A node started with `--emulate FILE` still computes
every token for real (tokens stay exact), then holds each result until the profile's time has
passed: a prefill's last layer until `T_prefill(uncached length)` after its compute began (each
layer's KV push paced on the way, so layer-wise streaming keeps its shape), a decode step until
`T_decode(batch size)` after it began. Times are the profile's times scaled:

    prefill hold = time_factor * T_prefill(uncached_tokens * length_scale)
    decode step  = time_factor * output_scale * T_decode(batch)

`length_scale` maps the real (short) prompts onto the profile's lengths, `output_scale` keeps a
request's whole decode time when it generates `output_scale` times fewer tokens. Where the real
compute takes longer than the profile allows, nothing is held and the overrun is counted: the
node's stats file (rewritten at most every `STATS_EVERY_S`) holds the real and emulated seconds,
so the report can show the share of real compute in the emulated time.

Torch-free and I/O-light: the hooks in the prefill and decode cores are one `await` each.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prfaas.scheduling.profiles import Profile

STATS_EVERY_S = 1.0


@dataclass(frozen=True)
class EmulatedProfile:
    """One node's emulated accelerator. `prefill_s` maps a length in profile tokens to seconds,
    `decode_step_s` a batch size to seconds; either may be None (that role is not emulated)."""

    name: str
    prefill_s: Profile | None = None
    decode_step_s: Profile | None = None
    time_factor: float = 1.0
    length_scale: float = 1.0
    output_scale: float = 1.0
    stats_path: str = ""  # where the node writes its real/emulated accounting; empty = nowhere

    def __post_init__(self) -> None:
        for name in ("time_factor", "length_scale", "output_scale"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and v != float("inf")):
                raise ValueError(f"emulated profile {self.name!r}: {name} must be a positive finite number, got {v!r}")

    def prefill_time(self, uncached_tokens: int) -> float:
        if self.prefill_s is None:
            return 0.0
        return self.time_factor * self.prefill_s(uncached_tokens * self.length_scale)

    def decode_time(self, batch: int) -> float:
        if self.decode_step_s is None or batch <= 0:
            return 0.0
        return self.time_factor * self.output_scale * self.decode_step_s(batch)

    def to_json(self) -> dict[str, Any]:
        def prof(p: Profile | None) -> dict[str, list[float]] | None:
            return None if p is None else {"lengths": list(p.lengths), "values": list(p.values)}

        return {"name": self.name, "prefill_s": prof(self.prefill_s), "decode_step_s": prof(self.decode_step_s),
                "time_factor": self.time_factor, "length_scale": self.length_scale,
                "output_scale": self.output_scale, "stats_path": self.stats_path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmulatedProfile:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"emulated profile: unknown keys {sorted(unknown)}")

        def prof(d: dict[str, list[float]] | None) -> Profile | None:
            return None if d is None else Profile.from_mapping(d)

        return cls(str(data.get("name", "")), prof(data.get("prefill_s")), prof(data.get("decode_step_s")),
                   float(data.get("time_factor", 1.0)), float(data.get("length_scale", 1.0)),
                   float(data.get("output_scale", 1.0)), str(data.get("stats_path", "")))

    @classmethod
    def load(cls, path: str | Path) -> EmulatedProfile:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--emulate {path}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))


@dataclass
class Accounting:
    """Seconds of real compute against seconds emulated, per role."""

    real_s: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    emulated_s: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    events: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    overruns: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})

    def add(self, role: str, real: float, emulated: float) -> None:
        self.real_s[role] += real
        self.emulated_s[role] += max(real, emulated)
        self.events[role] += 1
        self.overruns[role] += int(real > emulated)


class Emulator:
    """The runtime side of an `EmulatedProfile`: paces prefills, holds decode steps, accounts."""

    def __init__(self, profile: EmulatedProfile) -> None:
        self.profile = profile
        self.acct = Accounting()
        self._written_at = 0.0

    def prefill_pace(self, uncached_tokens: int, steps: int) -> PrefillPace:
        return PrefillPace(self, self.profile.prefill_time(uncached_tokens), max(1, steps))

    async def decode_step(self, started_at: float, batch: int) -> None:
        """Holds a decode step that began at `started_at` (monotonic) until its emulated time."""
        target = self.profile.decode_time(batch)
        real = time.monotonic() - started_at
        self.acct.add("decode", real, target)
        if target > real:
            await asyncio.sleep(target - real)
        self._maybe_write()

    def _maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.profile.stats_path or (not force and now - self._written_at < STATS_EVERY_S):
            return
        self._written_at = now
        data = {"profile": self.profile.name, "real_s": self.acct.real_s, "emulated_s": self.acct.emulated_s,
                "events": self.acct.events, "overruns": self.acct.overruns}
        tmp = f"{self.profile.stats_path}.tmp"
        try:
            Path(tmp).write_text(json.dumps(data))
            os.replace(tmp, self.profile.stats_path)
        except OSError:
            pass  # accounting is best effort; serving goes on


class PrefillPace:
    """One prefill's pacing: the k-th of `steps` layer pushes waits until k/steps of the emulated
    time has passed since the compute began; `done()` holds the first token until all of it."""

    def __init__(self, emulator: Emulator, total_s: float, steps: int) -> None:
        self.emulator, self.total_s, self.steps = emulator, total_s, steps
        self.t0 = time.monotonic()
        self.k = 0
        self.slept = 0.0

    async def _until(self, target: float) -> None:
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
            self.slept += delay

    async def step(self) -> None:
        self.k = min(self.k + 1, self.steps)
        await self._until(self.t0 + self.total_s * self.k / self.steps)

    async def done(self) -> None:
        real = time.monotonic() - self.t0 - self.slept
        self.emulator.acct.add("prefill", real, self.total_s)
        await self._until(self.t0 + self.total_s)
        self.emulator._maybe_write(force=True)


def load_emulator(path: str) -> Emulator | None:
    """The node's emulator from `--emulate PATH`; None when the flag is empty."""
    return Emulator(EmulatedProfile.load(path)) if path else None
