"""A free TCP port for a single-node launch's rendezvous (the script's own launch, ``fabric run`` under a sweep)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below Linux's default ephemeral range (32768-60999): ports the kernel never hands out on its own.
LOW, HIGH = 20000, 32767


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives to outgoing connections and to ``bind(0)``."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nobody listens on now, taken outside the kernel's ephemeral range.

    A port the OS picks (``bind(0)``) is ephemeral: between the pick and the rendezvous binding it, the kernel may
    give it to an outgoing connection of any process (gloo opens many), and the launch then fails with EADDRINUSE.
    """
    low, high = ephemeral_range()
    candidates = [port for port in range(LOW, HIGH + 1) if not low <= port <= high]
    # Drawn from the OS, not from `random`: a seeded run (seed_everything) would otherwise draw the same ports as
    # every other process seeded alike, and two launches at once would pick the same one.
    for port in random.SystemRandom().sample(candidates, min(64, len(candidates))):
        if is_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # a kernel with no ports outside its range
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
