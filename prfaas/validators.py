"""Value types of the configuration flags (prfaas/settings.py): each parses one flag's text or
raises ValueError with a message naming what was wrong."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (a listen address nothing off this machine can reach)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise ValueError(f"must be a positive integer, got {text}")
    return v


def non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise ValueError(f"must be >= 0, got {text}")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not v > 0 or v == float("inf"):
        raise ValueError(f"must be a positive finite number, got {text}")
    return v


def non_negative_float(text: str) -> float:
    v = float(text)
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"must be a finite number >= 0, got {text}")
    return v


def boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, got {text!r}")
    return text


def power_of_two_or_zero(text: str) -> int:
    v = non_negative_int(text)
    if v & (v - 1):
        raise ValueError(f"must be a power of two (or 0), got {text}")
    return v


MAX_THREADS = 1024


def thread_count(text: str) -> int:
    """0 (the library's default) or a thread count up to MAX_THREADS."""
    v = non_negative_int(text)
    if v > MAX_THREADS:
        raise ValueError(f"must be <= {MAX_THREADS}, got {text}")
    return v
