"""Kafka stopped for 60 s (TRON_KAFKA_OUTAGE_SECONDS) under load from 20 concurrent Forward clients:
the relay's RSS stays under a bound (read from /proc), no chunk is acked while the broker is down,
and once it is back every record reaches Kafka (read back through the sink). The broker keeps its
data across the restart (Tansu with S3 storage on moto)."""
import os
import socket
import ssl
import threading
import time

import msgpack
import pytest

import servers
import tron

OUTAGE = float(os.environ.get("TRON_KAFKA_OUTAGE_SECONDS", "60"))
CLIENTS = 20
# Chunks each client keeps unacked at once: 20 x 64 chunks of ~80 KB decode to more than the
# default budget, so the outage fills it and the bound is what is tested.
WINDOW = 64
RECORDS_PER_CHUNK = 400  # ~80 KB per chunk
# The relay runs at its default limits: max_inflight_bytes 256 MiB; the promise is RSS within it
# plus 64 MiB.
RSS_BOUND_MIB = 256 + 64


@pytest.fixture(scope="module")
def durable(workroot):
    svc = servers.Services(os.path.join(workroot, "durable-services"), kafka_storage="s3").start()
    yield svc
    svc.stop()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Client(threading.Thread):
    """A Forward client that behaves like fluent-bit with acks: a window of chunks in flight,
    and on a lost connection or ack time-out it reconnects and re-sends what was not acked."""

    def __init__(self, n, certs, host, port, stop):
        super().__init__(daemon=True)
        self.n, self.certs, self.host, self.port, self.stop = n, certs, host, port, stop
        self.next_seq = 0
        self.unacked = {}      # chunk id -> frame
        self.acks = []         # (time, chunk id)
        self.sent_records = 0
        self.reconnects = 0
        self.error = None

    def connect(self):
        ctx = ssl.create_default_context(cafile=self.certs["ca"])
        raw = socket.create_connection((self.host, self.port), timeout=10)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        sock.settimeout(1.0)
        return sock

    def chunk(self):
        base = self.next_seq
        self.next_seq += RECORDS_PER_CHUNK
        # Event times of the last minutes: the sink quarantines records further than 7 days
        # before their Kafka timestamp, which the relay sets to when it received them.
        now = int(time.time()) - 600
        entries = [[now + i % 300, {"c": self.n, "seq": base + i, "pad": "p" * 160}] for i in range(RECORDS_PER_CHUNK)]
        cid = "c%02d-%08d" % (self.n, base)
        self.sent_records += RECORDS_PER_CHUNK
        return cid, msgpack.packb(["load.c%02d" % self.n, entries, {"chunk": cid, "size": RECORDS_PER_CHUNK}])

    @staticmethod
    def send(sock, frame):
        # The relay may stop reading (backpressure) for as long as Kafka is away; a send that
        # cannot finish in 120 s leaves a partial frame, so the connection is dropped.
        sock.settimeout(120)
        try:
            sock.sendall(frame)
        except socket.timeout:
            raise ConnectionError("send blocked for 120 s")
        finally:
            sock.settimeout(1.0)

    def run(self):
        try:
            self.loop()
        except Exception as e:  # surfaced by the test
            self.error = repr(e)

    def loop(self):
        sock, unpacker, fresh = None, None, False
        last_progress = time.time()
        while True:
            if self.stop.is_set() and not self.unacked:
                break
            if sock is None:
                try:
                    sock = self.connect()
                except OSError:
                    time.sleep(0.5)
                    continue
                unpacker = msgpack.Unpacker(raw=False)
                last_progress = time.time()
                fresh = True
            try:
                if fresh:
                    fresh = False
                    for frame in list(self.unacked.values()):
                        self.send(sock, frame)
                while not self.stop.is_set() and len(self.unacked) < WINDOW:
                    cid, frame = self.chunk()
                    self.unacked[cid] = frame
                    self.send(sock, frame)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed by relay")
                unpacker.feed(data)
                for obj in unpacker:
                    cid = obj.get("ack")
                    if cid in self.unacked:
                        del self.unacked[cid]
                        self.acks.append((time.time(), cid))
                        last_progress = time.time()
            except socket.timeout:
                if time.time() - last_progress > 30:
                    sock.close()
                    sock = None
                    self.reconnects += 1
            except (OSError, ConnectionError, ssl.SSLError):
                try:
                    sock.close()
                except OSError:
                    pass
                sock = None
                self.reconnects += 1
                time.sleep(0.5)
        if sock is not None:
            sock.close()


def test_kafka_down_under_20_clients_bounds_memory_acks_nothing_and_loses_nothing(durable, certs, workroot, procs):
    work = os.path.join(workroot, "kafka-outage")
    relay, sink, host, port = tron.relay_to_gcs(
        durable, certs, work, procs, "outage", "outage", 3,
        columns=[{"name": "c", "source": "c", "type": "INTEGER"}, {"name": "seq", "source": "seq", "type": "INTEGER"}],
        kafka={"brokers": durable.kafka_brokers, "default_topic": "outage", "linger": "5ms", "compression": "lz4",
               "delivery_timeout": "20s"})
    stop = threading.Event()
    clients = [Client(n, certs, host, port, stop) for n in range(CLIENTS)]
    peak = {"kib": 0}
    sampling = threading.Event()

    inflight_samples = []
    # (time, tron_relay_chunks_acked_total): the relay counts an ack when it decides it, so this
    # is the claim at the moment it is made. A client's own ack times are not: a client blocked in
    # sendall by the relay's backpressure reads an ack the relay wrote before the outage only when
    # the send finishes (CI saw one read 21 s after the stop, when time-outs freed budget).
    acked_samples = []

    def sample():
        n = 0
        while not sampling.is_set():
            peak["kib"] = max(peak["kib"], rss_kib(relay.proc.pid))
            n += 1
            try:
                text = relay.metrics()
                acked_samples.append((time.time(), tron.metric(text, "tron_relay_chunks_acked_total") or 0))
                if n % 10 == 0:
                    inflight_samples.append(tron.metric(text, "tron_relay_inflight_bytes") or 0)
            except OSError:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for c in clients:
        c.start()
    time.sleep(8)
    acked_before = sum(len(c.acks) for c in clients)
    assert acked_before > 0, relay.tail()

    durable.servers["kafka"].stop()
    down_at = time.time()
    time.sleep(OUTAGE)
    durable.start_kafka()
    up_at = time.time()
    time.sleep(10)
    stop.set()
    for c in clients:
        c.join(timeout=180)
    sampling.set()
    assert not any(c.is_alive() for c in clients), "clients still waiting for acks:\n" + relay.tail()
    assert not [c.error for c in clients if c.error], [c.error for c in clients if c.error]

    # Nothing acked while the broker was gone, read from the relay's ack counter. The grace covers
    # chunks the broker confirmed just before it stopped. A wrong ack could only come from a
    # delivery failure (delivery_timeout, 20 s after the stop) or from a re-sent chunk (clients
    # re-send after 30 s without progress), both far past the grace.
    grace = 5.0
    during = [(t - down_at, n) for t, n in acked_samples if down_at + grace < t < up_at]
    assert len(during) > 10, "too few samples of the ack counter during the outage: %s" % during
    assert during[0][1] == during[-1][1], "relay acked %d chunks while Kafka was down: %s" % (
        during[-1][1] - during[0][1], [d for d in during if d[1] != during[0][1]][:5])
    peak_mib = peak["kib"] / 1024
    inflight_peak = max(inflight_samples) if inflight_samples else 0
    print("kafka outage at default limits: relay peak RSS %.0f MiB (bound %d MiB); tron_relay_inflight_bytes "
          "peaked at %.0f MiB of 256" % (peak_mib, RSS_BOUND_MIB, inflight_peak / (1 << 20)))
    assert peak_mib < RSS_BOUND_MIB, "relay peak RSS %.0f MiB over %d MiB" % (peak_mib, RSS_BOUND_MIB)
    metrics = relay.metrics()

    total = sum(c.sent_records for c in clients)
    expected = {(c.n, s) for c in clients for s in range(c.next_seq)}

    def arrived():
        got = set()
        for obj in durable.gcs_list("outage", "w/outage/"):
            if not obj["name"].rsplit("/", 1)[1].startswith("_"):
                for line in tron.read_gz_lines(durable.gcs_get("outage", obj["name"])):
                    c, s = line.split(",")
                    got.add((int(c), int(s)))
        return got

    got = tron.wait_until("every record in Kafka after the outage", lambda: (lambda g: g if g >= expected else None)(
        arrived()), timeout=240, interval=5, on_timeout=lambda: "%d of %d\n%s" % (
            len(arrived() & expected), len(expected), sink.tail()))
    assert got >= expected
    failures = [line for line in metrics.splitlines() if line.startswith("tron_relay_delivery_failures_total")]
    print("kafka outage %.0fs: %d clients, %d records sent, acked before outage %d chunks, peak relay RSS %.0f MiB "
          "(in-flight limit %d MiB, the default), reconnects %d, %s" % (
              OUTAGE, CLIENTS, total, acked_before, peak_mib, 256,
              sum(c.reconnects for c in clients), failures))
