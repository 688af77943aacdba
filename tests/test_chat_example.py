"""examples/chat.py: two terminal users talking through a real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import queue
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chat.py"


class Proc:
    """The example as a subprocess, its stdout lines in a queue."""

    def __init__(self, broker, user, peer):
        self.p = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--user", user, "--peer", peer,
             "--host", broker.host, "--port", str(broker.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in iter(self.p.stdout.readline, b""):
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))

    def expect(self, text, timeout=20.0):
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{text!r} not printed; got {seen}") from None
            seen.append(line)
            if text in line:
                return line

    def type(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)


def test_two_users_chat(any_broker):
    bob = Proc(any_broker, "bob", "alice")
    alice = None
    try:
        bob.expect("* joined chat/demo/dm/alice~bob as bob")
        alice = Proc(any_broker, "alice", "bob")
        alice.expect("* joined")
        bob.expect("* alice is online")
        alice.type("hello bob ✓")
        bob.expect("<alice> hello bob ✓")
        bob.type("hi alice")
        alice.expect("<bob> hi alice")
        alice.type("/quit")
        assert alice.expect("* bye")
        bob.expect("* alice is offline")  # her clean exit published "offline"
    finally:
        bob.close()
        if alice is not None:
            alice.close()
