"""A compose project driven by podman-compose, for scripts/compose_smoke.py: the services as
`podman-compose config` resolves them, bring-up in depends_on order with this script running the
health checks, logs, and a teardown that checks nothing is left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from compose_smoke_lib import SmokeError, say, sh

PROJECT_LABEL = "io.podman.compose.project"
SERVICE_LABEL = "io.podman.compose.service"
PORT_VARIABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]*_PORT):-\d+\}")


class Compose:
    def __init__(self, exe: Path, file: Path, project: str, env: dict[str, str], log_dir: Path) -> None:
        self.exe, self.file, self.project, self.env, self.log_dir = exe, file, project, env, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.services: dict[str, dict[str, Any]] = {}
        self._started: dict[str, float] = {}
        self._healthy: set[str] = set()

    # --- the file ---------------------------------------------------------------------------------
    def port_variables(self) -> set[str]:
        """Every `${NAME_PORT:-default}` in the file: the ports a run may move."""
        return set(PORT_VARIABLE.findall(self.file.read_text()))

    def load(self) -> None:
        import yaml

        # stdout alone: podman-compose warns on stderr
        r = subprocess.run(self._cmd("config"), env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SmokeError(f"podman-compose config failed:\n{r.stderr[-2000:]}")
        # services in a profile (Prometheus: `monitoring`) start only when it is asked for; the smoke
        # brings up the default set
        services = dict(yaml.safe_load(r.stdout)["services"])
        self.services = {n: s for n, s in services.items() if not s.get("profiles")}

    def builds(self) -> dict[str, dict[str, Any]]:
        """image -> build section, once per image built by some service."""
        return {s["image"]: s["build"] for s in self.services.values() if "build" in s}

    def prebuilt_images(self) -> set[str]:
        """Images of services without a build section: they must be on the machine already."""
        return {s["image"] for s in self.services.values() if "build" not in s and "image" in s}

    def depends(self, name: str) -> dict[str, str]:
        deps = self.services[name].get("depends_on") or {}
        if isinstance(deps, list):
            return {d: "service_started" for d in deps}
        return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}

    def waves(self) -> list[list[str]]:
        """The services in start order: each wave depends only on earlier ones."""
        level: dict[str, int] = {}

        def depth(name: str, seen: tuple[str, ...]) -> int:
            if name in seen:
                raise SmokeError(f"depends_on cycle: {' -> '.join((*seen, name))}")
            if name not in level:
                level[name] = 1 + max((depth(d, (*seen, name)) for d in self.depends(name)), default=-1)
            return level[name]

        for name in self.services:
            depth(name, ())
        return [sorted(n for n, lv in level.items() if lv == i) for i in range(max(level.values()) + 1)]

    def env_of(self, name: str) -> dict[str, str]:
        env = self.services[name].get("environment") or {}
        if isinstance(env, list):
            env = dict(str(item).split("=", 1) for item in env)
        return {str(k): str(v) for k, v in env.items()}

    def by_module(self, module: str) -> list[str]:
        """The services whose command runs `python -m services.<module>`."""
        return sorted(n for n, s in self.services.items() if f"services.{module}" in (s.get("command") or []))

    def has_healthcheck(self, name: str) -> bool:
        hc = self.services[name].get("healthcheck") or {}
        return bool(hc.get("test")) and hc["test"] != ["NONE"] and not hc.get("disable")

    # --- bring-up ---------------------------------------------------------------------------------
    def up_wave(self, wave: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        needs = {(d, c) for n in wave for d, c in self.depends(n).items()}
        for dep, condition in sorted(needs):
            self.wait_condition(dep, condition, deadline)
        say(f"up: {' '.join(wave)}")
        self._pc("up", "-d", "--no-deps", "--no-build", *wave, timeout=300)
        now = time.monotonic()
        self._started.update({n: now for n in wave})

    def wait_condition(self, name: str, condition: str, deadline: float) -> None:
        if condition == "service_healthy":
            return self.wait_healthy(name, deadline)
        while True:
            state = self.inspect(name)["State"]
            if condition == "service_started" and state["Status"] in ("running", "exited"):
                return
            if condition == "service_completed_successfully" and state["Status"] == "exited":
                if state["ExitCode"] != 0:
                    raise SmokeError(f"{name} exited with {state['ExitCode']}:\n{self.logs(name)}")
                say(f"completed: {name}")
                return
            if time.monotonic() > deadline:
                raise SmokeError(f"{name}: not {condition} in time (status {state['Status']})")
            time.sleep(1)

    def wait_healthy(self, name: str, deadline: float) -> None:
        """Runs the service's own healthcheck (`podman healthcheck run`) until it passes."""
        last = ""
        while True:
            state = self.inspect(name)["State"]
            if state["Status"] != "running":
                raise SmokeError(f"{name} is {state['Status']} (exit {state['ExitCode']}):\n{self.logs(name)}")
            r = sh(["podman", "healthcheck", "run", self.container(name)], timeout=120, check=False)
            if r.returncode == 0:
                if name not in self._healthy:
                    since = time.monotonic() - self._started.get(name, time.monotonic())
                    say(f"healthy: {name} ({since:.0f} s after its start)")
                self._healthy.add(name)
                return
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exit {r.returncode}"
            if time.monotonic() > deadline:
                raise SmokeError(f"{name}: not healthy in time; last check: {last}\n{self.logs(name)}")
            time.sleep(2)

    def wait_all_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for name in self.services:
            if self.has_healthcheck(name):
                self.wait_healthy(name, deadline)

    # --- containers -------------------------------------------------------------------------------
    def containers(self) -> dict[str, str]:
        """container name -> service, for every container of the project."""
        r = sh(["podman", "ps", "-a", "--filter", f"label={PROJECT_LABEL}={self.project}", "--format", "json"],
               timeout=60)
        return {c["Names"][0]: c["Labels"].get(SERVICE_LABEL, "") for c in json.loads(r.stdout or "[]")}

    def container(self, service: str) -> str:
        names = [c for c, s in self.containers().items() if s == service]
        if not names:
            raise SmokeError(f"no container for service {service}")
        return names[0]

    def inspect(self, service: str) -> dict[str, Any]:
        return dict(json.loads(sh(["podman", "inspect", self.container(service)], timeout=60).stdout)[0])

    def logs(self, service: str, tail: int = 25) -> str:
        r = sh(["podman", "logs", "--tail", str(tail), self.container(service)], timeout=60, check=False)
        return "\n".join(f"    | {line}" for line in r.stdout.splitlines())

    def dump_logs(self) -> None:
        for name, service in sorted(self.containers().items(), key=lambda kv: kv[1]):
            say(f"logs of {service} ({name}):\n{self.logs(service)}")

    # --- teardown ---------------------------------------------------------------------------------
    def down_command(self) -> str:
        return " ".join(self._cmd("down", "-v"))

    def down(self, quiet: bool = False) -> None:
        if self.containers() or self._volumes():
            if quiet:
                say(f"removing what an earlier run of project {self.project} left")
            self._pc("down", "-v", "-t", "10", timeout=300)

    def teardown_checked(self) -> None:
        """`down -v`, then: no container or volume of the project, and none of its processes
        (each container's init process and conmon, matched by PID and start time) still alive."""
        procs = self._processes()
        self._pc("down", "-v", "-t", "10", timeout=300)
        deadline = time.monotonic() + 20
        while (alive := [p for p in procs if _alive(*p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [f"container {c}" for c in self.containers()] + [f"volume {v}" for v in self._volumes()]
        left += [f"process {pid}" for pid, _ in alive]
        if left:
            for pid, _ in alive:
                os.kill(pid, 9)
            sh(["podman", "rm", "-f", *self.containers()], timeout=120, check=False)
            raise SmokeError(f"left after teardown: {', '.join(left)}")
        say(f"torn down: no container, volume or process left ({len(procs)} processes checked)")

    def _volumes(self) -> list[str]:
        r = sh(["podman", "volume", "ls", "--filter", f"label={PROJECT_LABEL}={self.project}", "--format",
                "{{.Name}}"], timeout=60)
        return r.stdout.split()

    def _processes(self) -> list[tuple[int, str]]:
        procs = []
        for service in set(self.containers().values()):
            state = self.inspect(service)["State"]
            for key in ("Pid", "ConmonPid"):
                pid = int(state.get(key) or 0)
                if pid and (start := _start_time(pid)):
                    procs.append((pid, start))
        return procs

    def _cmd(self, *args: str) -> list[str]:
        return [str(self.exe), "--in-pod", "false", "-p", self.project, "-f", str(self.file), *args]

    def _pc(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return sh(self._cmd(*args), timeout=timeout, env=self.env, log=self.log_dir / "podman-compose.log",
                  what=f"podman-compose {args[0]}")


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _alive(pid: int, start: str) -> bool:
    """Still running: same PID and start time (not reused), and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] == start and fields[0] != "Z"
