#!/usr/bin/env python3
"""
The task channel's memory under hostile local connections (issue 11, item 8).

    python benchmarks/channel_memory.py [--runs 3] [--connections 1500]
                                        [--messages 400] [--message-kib 900]
                                        [--json FILE]

The real L{everest_agent.channel.TaskChannel} runs in a child process with a
real reactor on a loopback port; this process attacks it with real sockets
and reads the child's VmRSS from /proc/<pid>/status.  Each run starts a new
child and measures, against that child's own idle RSS (the baseline of the
same run), and the same against the same code with its bounds lifted (the
baseline, as the channel was before; runs alternate):

 1. --connections connections that each send the 4-byte length of a
    128 KiB frame and then 100 KiB of it, and stay open (partial frames);
 2. --messages platform messages of --message-kib KiB each for a task that
    never connects.

Goals: growth under 16 MiB for 1 and under the channel's byte cap
(MAX_WAITING_BYTES) plus 8 MiB for 2; the figures are medians over --runs,
with the ratio to the baseline.
"""

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
MiB = 1 << 20
TASK = "bench-1-0"


def child(unbounded):
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    from everest_agent.channel import TaskChannel, TaskChannelProtocol
    from everest_agent.protocol import ProtocolError

    limits = {}
    if unbounded:
        # The baseline: the same code with its bounds lifted, as the channel
        # was before it had them.
        huge = 1 << 40
        limits = dict(open_timeout=3600, max_connections=huge, max_opening=huge,
                      max_waiting_bytes=huge, max_waiting_total=huge)
        TaskChannelProtocol.MAX_LENGTH = TaskChannelProtocol.OPENED_MAX_LENGTH
    channel = TaskChannel(lambda task_id: True, lambda task_id, text: None, reactor, **limits)
    port = reactor.listenTCP(0, channel, interface="127.0.0.1")

    class Commands(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self):
            self.say({"pid": os.getpid(), "port": port.getHost().port})

        def say(self, value):
            self.sendLine(json.dumps(value).encode())

        def lineReceived(self, line):
            words = line.decode().split()
            if words[0] == "queue":
                count, size = int(words[1]), int(words[2])
                refused = 0
                for i in range(count):
                    try:
                        channel.to_task(TASK, chr(ord("a") + i % 26) * size)
                    except ProtocolError:
                        refused += 1
                self.say({"waiting": channel.waiting_total, "refused": refused})
            elif words[0] == "count":
                self.say({"connections": len(channel._all)})
            elif words[0] == "exit":
                reactor.stop()

    stdio.StandardIO(Commands())
    reactor.run()


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Child:
    def __init__(self, unbounded=False):
        mode = ["unbounded"] if unbounded else []
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"] + mode,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = self.ask(None)
        self.pid, self.port = hello["pid"], hello["port"]

    def ask(self, command):
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the channel's process died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)


def settle():
    time.sleep(0.5)


def partial_frames(channel, count):
    """Open C{count} connections that each hold a partial 128 KiB frame."""
    sockets, refused = [], 0
    for _ in range(count):
        s = socket.socket()
        s.setblocking(True)
        try:
            s.connect(("127.0.0.1", channel.port))
            s.settimeout(0.5)
            s.sendall(struct.pack(">I", 128 * 1024) + b"p" * (100 * 1024))
        except OSError:
            refused += 1
            s.close()
            continue
        sockets.append(s)
    settle()
    held = channel.ask("count")["connections"]
    return sockets, refused, held


def one_run(options, unbounded=False):
    """Each part in a new process, so that neither reuses the other's freed memory."""
    channel = Child(unbounded)
    try:
        settle()
        idle = rss(channel.pid)
        sockets, refused, held = partial_frames(channel, options.connections)
        after_connections = rss(channel.pid)
        for s in sockets:
            s.close()
    finally:
        channel.close()
    channel = Child(unbounded)
    try:
        settle()
        idle2 = rss(channel.pid)
        queued = channel.ask(f"queue {options.messages} {options.message_kib * 1024}")
        settle()
        after_messages = rss(channel.pid)
    finally:
        channel.close()
    return {
        "idle_rss": idle,
        "connections_growth": after_connections - idle,
        "connections_held": held,
        "messages_growth": after_messages - idle2,
        "messages_waiting_bytes": queued["waiting"],
        "messages_refused": queued["refused"],
    }


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:] == ["unbounded"])
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--message-kib", type=int, default=900)
    parser.add_argument("--json")
    options = parser.parse_args()
    from everest_agent.channel import MAX_WAITING_BYTES

    load = os.getloadavg()
    runs, baseline = [], []
    for _ in range(options.runs):  # alternating, so that both see the same machine
        baseline.append(one_run(options, unbounded=True))
        runs.append(one_run(options))
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    base = {key: statistics.median(r[key] for r in baseline) for key in baseline[0]}
    load_after = os.getloadavg()

    def ratio(key):
        return f"{median[key] / base[key]:.2f}" if base[key] > 0 else "-"

    print(f"machine load (1/5/15 min): before {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; medians over {options.runs} runs")
    print(f"idle RSS of the channel's process: {median['idle_rss'] / MiB:.1f} MiB "
          f"(baseline without bounds: {base['idle_rss'] / MiB:.1f} MiB)")
    print(f"1. {options.connections} connections holding partial 128 KiB frames: "
          f"+{median['connections_growth'] / MiB:.1f} MiB, {median['connections_held']:.0f} held open; "
          f"without bounds +{base['connections_growth'] / MiB:.1f} MiB, {base['connections_held']:.0f} held; "
          f"ratio {ratio('connections_growth')}")
    print(f"2. {options.messages} x {options.message_kib} KiB for a task that never connects: "
          f"+{median['messages_growth'] / MiB:.1f} MiB, {median['messages_waiting_bytes'] / MiB:.1f} MiB kept "
          f"(cap {MAX_WAITING_BYTES / MiB:.0f} MiB); without bounds +{base['messages_growth'] / MiB:.1f} MiB, "
          f"{base['messages_waiting_bytes'] / MiB:.1f} MiB kept; ratio {ratio('messages_growth')}")
    ok = (median["connections_growth"] < 16 * MiB
          and median["messages_growth"] < MAX_WAITING_BYTES + 8 * MiB)
    print("goals (1 < 16 MiB, 2 < cap + 8 MiB):", "met" if ok else "NOT met")
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"runs": runs, "baseline": baseline, "median": median, "baseline_median": base,
                       "load": [load, load_after]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
