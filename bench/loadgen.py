"""Loopback MQTT load generator for comparing brokers (fastmqtt vs Mosquitto).

Theory of operation
-------------------
The generator must not be the bottleneck, so it does as little Python per
message as possible:

* Every packet is encoded once with ``fastmqtt.codec`` before the clock starts;
  QoS 0 publishers send a pre-joined batch of identical PUBLISH packets per
  ``sendall``. QoS 1 publishers patch nothing at run time either: all 65535
  packet-id variants are pre-encoded.
* Publishers and subscribers run in separate OS processes (``multiprocessing``
  with fork), so the publishing loop and the counting loop do not share one
  interpreter (or one GIL) with each other or with pytest.
* Subscribers count deliveries by walking fixed headers only (type nibble and
  Remaining Length); they look inside a PUBLISH only to answer QoS 1 with a
  PUBACK or, in the latency scenario, to read the send timestamp at the end of
  the payload.
* All processes connect and subscribe first, report "ready", and then wait on
  one ``Event``; the orchestrator notes ``time.monotonic()`` and sets it. Since
  CLOCK_MONOTONIC is system-wide on Linux, times taken in different processes
  compare directly. A throughput figure is ``deliveries / (last delivery - go)``.

Nothing here asserts a speed: the functions return numbers, the benchmark
prints them next to Mosquitto's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import selectors
import socket
import struct
import time
from dataclasses import dataclass

from fastmqtt import codec

__all__ = [
    "encode_connect", "encode_subscribe", "encode_publish", "rss_kib",
    "run_throughput", "run_latency", "run_connect_rate", "run_idle_memory", "cpu_seconds",
    "wait_idle",
]

CTX = mp.get_context("fork")
PUBACK = 0x40


# ------------------------------------------------------------------ encoding

def encode_connect(client_id: str, version: int = 5, keep_alive: int = 0) -> bytes:
    """CONNECT with clean start and (v5) no properties."""
    return codec.encode(codec.Connect(client_id, clean_start=True, keep_alive=keep_alive), version)


def encode_subscribe(topic_filter: str, qos: int = 0, packet_id: int = 1, version: int = 5) -> bytes:
    return codec.encode(codec.Subscribe(packet_id, [codec.Subscription(topic_filter, qos)]), version)


def encode_publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, version: int = 5) -> bytes:
    return codec.encode(codec.Publish(topic, payload, qos=qos, packet_id=packet_id), version)


# ----------------------------------------------------------------- low level

def _read_varint(buf, i: int, end: int):
    """Remaining Length at ``buf[i:]``: (value, index after it), or None if incomplete."""
    mult = 1
    value = 0
    while i < end:
        b = buf[i]
        i += 1
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, i
        mult <<= 7
    return None


def _recv_exact_packets(sock: socket.socket, count: int, timeout: float = 30.0) -> list[int]:
    """Read ``count`` whole packets (any type) and return their type bytes."""
    sock.settimeout(timeout)
    buf = bytearray()
    types = []
    while len(types) < count:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("broker closed the connection during setup")
        buf += data
        i = 0
        while len(types) < count:
            if len(buf) - i < 2:
                break
            r = _read_varint(buf, i + 1, len(buf))
            if r is None:
                break
            length, start = r
            if start + length > len(buf):
                break
            types.append(buf[i])
            i = start + length
        del buf[:i]
    sock.settimeout(None)
    return types


def open_client(host: str, port: int, client_id: str, subscribe: str | None = None, qos: int = 0,
                version: int = 5) -> socket.socket:
    """A connected (and optionally subscribed) blocking socket; CONNACK/SUBACK consumed."""
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = encode_connect(client_id, version)
    n = 1
    if subscribe is not None:
        data += encode_subscribe(subscribe, qos, 1, version)
        n = 2
    s.sendall(data)  # SUBSCRIBE may follow CONNECT without waiting for CONNACK
    types = _recv_exact_packets(s, n)
    if types[0] != 0x20:
        raise ConnectionError(f"expected CONNACK, got 0x{types[0]:02x}")
    return s


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, quiet: float = 0.1, timeout: float = 10.0) -> bool:
    """Wait (bounded) until process ``pid`` uses no CPU for ``quiet`` seconds,
    e.g. a broker still handling the disconnects of a previous round.

    Returns:
        True once idle, False at the timeout.
    """
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now == last:
            return True
        last = now
    return False


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------- workers

def _subscriber(host, port, n_conns, topic, qos, expected_per_conn, want_latency, idle_timeout,
                max_seconds, ready, go, results, tag):
    try:
        socks = [open_client(host, port, f"{tag}-s{i}", topic, qos) for i in range(n_conns)]
    except Exception as e:  # report instead of hanging the orchestrator
        ready.put(("error", repr(e)))
        return
    sel = selectors.DefaultSelector()
    state = {}
    for s in socks:
        s.setblocking(False)
        state[s] = bytearray()
        sel.register(s, selectors.EVENT_READ)
    ready.put(("ready", os.getpid()))
    go.wait()
    expected = expected_per_conn * n_conns
    received = 0
    t_first = t_last = 0.0
    latencies: list[int] = []
    hard_deadline = time.monotonic() + max_seconds
    last_activity = time.monotonic()
    open_socks = len(socks)
    while received < expected and open_socks:
        now = time.monotonic()
        if now > hard_deadline or now - last_activity > idle_timeout:
            break
        events = sel.select(0.2)
        if not events:
            continue
        for key, _ in events:
            s = key.fileobj
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(s)
                open_socks -= 1
                continue
            now_ns = time.monotonic_ns() if want_latency else 0
            buf = state[s]
            buf += data
            end = len(buf)
            i = 0
            n = 0
            acks = []
            while end - i >= 2:
                first = buf[i]
                # Remaining Length, inlined for the common one- and two-byte cases.
                b1 = buf[i + 1]
                if b1 < 0x80:
                    length, start = b1, i + 2
                else:
                    r = _read_varint(buf, i + 1, end)
                    if r is None:
                        break
                    length, start = r
                stop = start + length
                if stop > end:
                    break
                if first >> 4 == 3:
                    n += 1
                    if first & 0x06:  # QoS 1: answer with PUBACK
                        tlen = (buf[start] << 8) | buf[start + 1]
                        pid_at = start + 2 + tlen
                        acks.append(b"\x40\x02" + bytes(buf[pid_at:pid_at + 2]))
                    if want_latency:
                        sent_ns = struct.unpack_from(">Q", buf, stop - 8)[0]
                        latencies.append(now_ns - sent_ns)
                i = stop
            del buf[:i]
            if acks:
                s.setblocking(True)
                s.sendall(b"".join(acks))
                s.setblocking(False)
            if n:
                t = time.monotonic()
                if not received:
                    t_first = t
                t_last = t
                received += n
                last_activity = t
    results.put({"kind": "sub", "received": received, "expected": expected, "t_first": t_first,
                 "t_last": t_last, "latencies_ns": latencies})
    for s in socks:
        s.close()


def _publisher(host, port, n_conns, topic, n_per_conn, qos, window, payload_size, ready, go, results, tag):
    try:
        socks = [open_client(host, port, f"{tag}-p{i}") for i in range(n_conns)]
    except Exception as e:
        ready.put(("error", repr(e)))
        return
    payload = b"x" * payload_size
    ready.put(("ready", os.getpid()))
    if qos == 0:
        pkt = encode_publish(topic, payload)
        batch_n = 64
        batch = pkt * batch_n
        go.wait()
        t0 = time.monotonic()
        # Round-robin over this process's connections, one batch at a time.
        remaining = [n_per_conn] * n_conns
        active = list(range(n_conns))
        while active:
            nxt = []
            for k in active:
                r = remaining[k]
                if r >= batch_n:
                    socks[k].sendall(batch)
                    r -= batch_n
                else:
                    socks[k].sendall(pkt * r)
                    r = 0
                remaining[k] = r
                if r:
                    nxt.append(k)
            active = nxt
        # A PINGREQ round trip per connection: the broker has read everything.
        for s in socks:
            s.sendall(b"\xc0\x00")
        for s in socks:
            _recv_exact_packets(s, 1)
        t1 = time.monotonic()
        results.put({"kind": "pub", "sent": n_per_conn * n_conns, "t0": t0, "t1": t1})
    else:
        # QoS 1 with a window: up to ``window`` PUBLISHes unacknowledged per connection.
        head = encode_publish(topic, payload, qos=1, packet_id=1)
        # The packet id sits right after the topic: patch-free pre-encoding of all ids.
        tl = len(topic.encode())
        r = _read_varint(head, 1, len(head))
        pid_at = r[1] + 2 + tl
        pre, post = head[:pid_at], head[pid_at + 2:]
        packets = [pre + struct.pack(">H", pid) + post for pid in range(1, 65536)]
        go.wait()
        t0 = time.monotonic()
        sel = selectors.DefaultSelector()
        st = {}
        for s in socks:
            st[s] = {"sent": 0, "acked": 0, "buf": bytearray()}
            s.setblocking(True)
            first = min(window, n_per_conn)
            s.sendall(b"".join(packets[i % 65535] for i in range(first)))
            st[s]["sent"] = first
            sel.register(s, selectors.EVENT_READ)
        done = 0
        while done < len(socks):
            for key, _ in sel.select(5.0):
                s = key.fileobj
                d = st[s]
                data = s.recv(1 << 20)
                if not data:
                    raise ConnectionError("broker closed a publisher")
                buf = d["buf"]
                buf += data
                i = 0
                acks = 0
                end = len(buf)
                while end - i >= 2:
                    r = _read_varint(buf, i + 1, end)
                    if r is None:
                        break
                    length, start = r
                    if start + length > end:
                        break
                    if buf[i] >> 4 == 4:
                        acks += 1
                    i = start + length
                del buf[:i]
                d["acked"] += acks
                can = min(n_per_conn - d["sent"], window - (d["sent"] - d["acked"]))
                if can > 0:
                    s.sendall(b"".join(packets[(d["sent"] + j) % 65535] for j in range(can)))
                    d["sent"] += can
                if d["acked"] >= n_per_conn:
                    sel.unregister(s)
                    done += 1
        t1 = time.monotonic()
        results.put({"kind": "pub", "sent": n_per_conn * n_conns, "t0": t0, "t1": t1})
    for s in socks:
        s.close()


def _paced_publisher(host, port, topic, rate, seconds, payload_size, ready, go, results, tag):
    s = open_client(host, port, f"{tag}-lat")
    pad = b"p" * max(0, payload_size - 8)
    # Encode the header once; only the 8-byte timestamp at the end changes.
    head = encode_publish(topic, pad + b"\0" * 8)[:-8]
    ready.put(("ready", os.getpid()))
    go.wait()
    n = int(rate * seconds)
    interval = 1.0 / rate
    t0 = time.monotonic()
    pack = struct.pack
    # Paced by sleeping, never by spinning: at 5,000 msg/s a spin-wait holds
    # one of this machine's two cores the whole run, and the broker then
    # loses its core to the subscriber for whole scheduler ticks (4 ms
    # stalls that land in the p99). A late wake-up only delays a send; the
    # latency is measured from the timestamp taken at the send.
    sleep = time.sleep
    for k in range(n):
        due = t0 + k * interval
        now = time.monotonic()
        if now < due:
            sleep(due - now)
        s.sendall(head + pack(">Q", time.monotonic_ns()))
    results.put({"kind": "pub", "sent": n, "t0": t0, "t1": time.monotonic()})
    s.close()


def _connector(host, port, clients, batch, tag, ready, go, results, hold):
    """Connect+subscribe ``clients`` clients, ``batch`` at a time pipelined.

    Kept cheap so the broker, not this process, sets the pace: the address is
    resolved and every CONNECT+SUBSCRIBE encoded before the clock starts, and
    replies are read with plain blocking ``recv`` (no per-socket timeout, which
    would cost two ``fcntl`` and a ``poll`` per read; the orchestrator's own
    timeout still bounds a broker that never answers)."""
    family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    hello = [encode_connect(f"{tag}-{i}") + encode_subscribe(f"cr/{tag}/{i}", 0)
             for i in range(clients)]
    ready.put(("ready", os.getpid()))
    go.wait()
    t0 = time.monotonic()
    socks = []
    new_socket = socket.socket
    for b0 in range(0, clients, batch):
        group = []
        for i in range(b0, min(clients, b0 + batch)):
            s = new_socket(family, type_, proto)
            s.connect(addr)
            s.sendall(hello[i])
            group.append(s)
        for s in group:
            # CONNACK (4 bytes for 3.1.1, 5+ for v5) then SUBACK: both small,
            # usually in one segment; read until two whole packets are here.
            buf = s.recv(256)
            while True:
                end = len(buf)
                if end >= 2 and buf[1] < 0x80 and end >= 2 + buf[1] + 2:
                    j = 2 + buf[1]
                    if buf[j + 1] < 0x80 and end >= j + 2 + buf[j + 1]:
                        break
                more = s.recv(256)
                if not more:
                    raise ConnectionError("broker closed the connection during connect")
                buf += more
            assert buf[0] == 0x20 and buf[2 + buf[1]] == 0x90, buf
        socks.extend(group)
    t1 = time.monotonic()
    results.put({"kind": "conn", "clients": clients, "t0": t0, "t1": t1})
    hold.wait(60)
    for s in socks:
        s.close()


def _idle_holder(host, port, n, tag, ready, hold):
    socks = []
    try:
        for b0 in range(0, n, 200):
            group = []
            for i in range(b0, min(n, b0 + 200)):
                s = socket.create_connection((host, port))
                s.sendall(encode_connect(f"{tag}-{i}", keep_alive=0))
                group.append(s)
            for s in group:
                _recv_exact_packets(s, 1)
            socks.extend(group)
    except Exception as e:
        ready.put(("error", repr(e)))
        return
    ready.put(("ready", len(socks)))
    hold.wait(120)
    for s in socks:
        s.close()


# -------------------------------------------------------------- orchestrator

@dataclass
class _Run:
    procs: list
    ready: object
    go: object
    results: object


def _wait_ready(run: _Run, n: int, timeout: float = 60.0) -> None:
    for _ in range(n):
        kind, info = run.ready.get(timeout=timeout)
        if kind == "error":
            raise RuntimeError(f"load generator worker failed during setup: {info}")


def _collect(run: _Run, n: int, timeout: float) -> list[dict]:
    out = [run.results.get(timeout=timeout) for _ in range(n)]
    for p in run.procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return out


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts) if base + (1 if i < extra else 0)]


def run_throughput(host: str, port: int, *, publishers: int = 1, pub_procs: int = 1, subscribers: int = 1,
                   sub_procs: int = 1, messages_per_publisher: int = 10000, qos: int = 0, window: int = 100,
                   payload_size: int = 64, topic: str = "bench/t", tag: str = "tp",
                   idle_timeout: float = 3.0, max_seconds: float = 120.0) -> dict:
    """Publishers send to one topic that every subscriber subscribes to.

    Args:
        publishers / pub_procs: publishing connections, spread over processes.
        subscribers / sub_procs: subscribing connections, spread over processes.
        messages_per_publisher: PUBLISH packets per publishing connection.
        qos: 0, or 1 (publishers keep ``window`` unacknowledged; subscribers
            subscribe at QoS 1 and acknowledge every delivery).
    Returns:
        ``deliveries`` (received by all subscribers), ``expected``, ``seconds``
        (go -> last delivery), ``rate`` (deliveries/s), ``publish_rate``
        (accepted PUBLISHes/s at the publishers), ``loss`` (fraction).
    """
    ready, results = CTX.Queue(), CTX.Queue()
    go = CTX.Event()
    total_msgs = publishers * messages_per_publisher
    procs = []
    for k, n in enumerate(_split(subscribers, sub_procs)):
        procs.append(CTX.Process(target=_subscriber, daemon=True, args=(
            host, port, n, topic, qos, total_msgs, False, idle_timeout, max_seconds,
            ready, go, results, f"{tag}{k}")))
    for k, n in enumerate(_split(publishers, pub_procs)):
        procs.append(CTX.Process(target=_publisher, daemon=True, args=(
            host, port, n, topic, messages_per_publisher, qos, window, payload_size,
            ready, go, results, f"{tag}{k}")))
    for p in procs:
        p.start()
    run = _Run(procs, ready, go, results)
    try:
        _wait_ready(run, len(procs))
        t_go = time.monotonic()
        go.set()
        res = _collect(run, len(procs), max_seconds + 30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    subs = [r for r in res if r["kind"] == "sub"]
    pubs = [r for r in res if r["kind"] == "pub"]
    deliveries = sum(r["received"] for r in subs)
    expected = total_msgs * subscribers
    t_end = max((r["t_last"] for r in subs if r["received"]), default=t_go)
    seconds = max(t_end - t_go, 1e-9)
    pub_seconds = max(max(r["t1"] for r in pubs) - t_go, 1e-9)
    return {"deliveries": deliveries, "expected": expected, "seconds": seconds,
            "rate": deliveries / seconds, "publish_rate": total_msgs / pub_seconds,
            "loss": 1 - deliveries / expected if expected else 0.0}


def run_latency(host: str, port: int, *, rate: float = 5000, seconds: float = 5.0, payload_size: int = 64,
                topic: str = "bench/lat", tag: str = "lat") -> dict:
    """One paced publisher at ``rate`` msg/s, one QoS 0 subscriber; the payload
    carries the send time. Returns p50/p99/max in microseconds."""
    ready, results = CTX.Queue(), CTX.Queue()
    go = CTX.Event()
    n = int(rate * seconds)
    procs = [
        CTX.Process(target=_subscriber, daemon=True, args=(
            host, port, 1, topic, 0, n, True, 3.0, seconds + 30, ready, go, results, tag)),
        CTX.Process(target=_paced_publisher, daemon=True, args=(
            host, port, topic, rate, seconds, payload_size, ready, go, results, tag)),
    ]
    for p in procs:
        p.start()
    run = _Run(procs, ready, go, results)
    try:
        _wait_ready(run, 2)
        go.set()
        res = _collect(run, 2, seconds + 60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    sub = next(r for r in res if r["kind"] == "sub")
    lat = sorted(sub["latencies_ns"])
    if not lat:
        return {"n": 0, "p50_us": float("nan"), "p99_us": float("nan"), "max_us": float("nan")}

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0

    return {"n": len(lat), "expected": n, "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": lat[-1] / 1000.0}


def run_connect_rate(host: str, port: int, *, clients: int = 2000, procs: int = 2, batch: int = 50,
                     tag: str = "cr") -> dict:
    """CONNECT+SUBSCRIBE (pipelined, ``batch`` in flight per process) for
    ``clients`` new clients; returns clients/s from go to the last SUBACK."""
    ready, results = CTX.Queue(), CTX.Queue()
    go = CTX.Event()
    hold = CTX.Event()
    ps = [CTX.Process(target=_connector, daemon=True, args=(
        host, port, n, batch, f"{tag}{k}", ready, go, results, hold)) for k, n in enumerate(_split(clients, procs))]
    for p in ps:
        p.start()
    try:
        for _ in ps:
            ready.get(timeout=60)
        t_go = time.monotonic()
        go.set()
        res = [results.get(timeout=120) for _ in ps]
        hold.set()
        for p in ps:
            p.join(30)
    finally:
        for p in ps:
            if p.is_alive():
                p.kill()
    seconds = max(r["t1"] for r in res) - t_go
    return {"clients": clients, "seconds": seconds, "rate": clients / seconds}


def run_idle_memory(host: str, port: int, broker_pid: int, *, connections: int = 5000, tag: str = "idle",
                    settle: float = 0.5) -> dict:
    """Broker RSS before and after ``connections`` idle (connected, keepalive 0)
    clients; returns KiB per connection."""

    def settled_rss():
        # Wait (bounded) until RSS stops moving: the broker has finished
        # allocating for the new connections.
        last = rss_kib(broker_pid)
        for _ in range(20):
            time.sleep(settle)
            now = rss_kib(broker_pid)
            if abs(now - last) <= max(64, last // 200):
                return now
            last = now
        return last

    before = settled_rss()
    ready = CTX.Queue()
    hold = CTX.Event()
    p = CTX.Process(target=_idle_holder, daemon=True, args=(host, port, connections, tag, ready, hold))
    p.start()
    try:
        kind, info = ready.get(timeout=120)
        if kind == "error":
            raise RuntimeError(f"idle connections failed: {info}")
        after = settled_rss()
    finally:
        hold.set()
        p.join(30)
        if p.is_alive():
            p.kill()
    return {"connections": connections, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_conn": (after - before) / connections}
