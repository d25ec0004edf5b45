"""Whether a server can listen on a port, and which process holds it if not."""

from __future__ import annotations

import errno
import random
import socket

MAX_COMMAND = 160
LOWEST_PICKED_PORT = 20000
"""`free_port` picks from here up to the kernel's ephemeral range."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, picked at random below the kernel's ephemeral range: the ports it hands out for
    a bind to port 0 (torch's rendezvous, gloo, another test worker's engine) and for outgoing connections never
    take it between this check and the server's own bind."""
    pick = random.SystemRandom()  # not the seeded module state: parallel test processes would pick alike
    low, high = LOWEST_PICKED_PORT, _ephemeral_ports()[0]
    for _ in range(200 if high - low >= 1000 else 0):
        port = pick.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # no room below the ephemeral range: let the kernel pick
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_taken(address: str, port: int) -> bool:
    """Someone listens on (address, port), or on the port of every address; a closing socket does not count."""
    try:
        infos = socket.getaddrinfo(address or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # a bad address is the server's to report
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def port_holder(port: int) -> str:
    """`pid N (its command line)` of the process listening on `port`, or why it cannot be named."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return "a process this user cannot see"
    pids = [c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    if not pids:
        return "no process this user can see"
    if pids[0] is None:
        return "a process of another user"
    try:
        proc = psutil.Process(pids[0])
        command = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        command = "command line not readable"
    if len(command) > MAX_COMMAND:
        command = command[:MAX_COMMAND - 3] + "..."
    return f"pid {pids[0]} ({command})"
