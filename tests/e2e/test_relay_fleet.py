"""A relay fleet (issue 25), at the shipped defaults: 4 agents, each given both relays
(`addresses = [r1, r2]`), 200 lines/s each, through agent -> relay -> Tansu -> sink -> fake-gcs.
- Spread: each relay delivers 40-60 % of a minute's records, and again in the minute after one
  relay restarts.
- A hung relay (SIGSTOP for 60 s, socket open, nothing read): >= 95 % of the lines written
  meanwhile are in Kafka through the other relay before it resumes; afterwards every line is in
  GCS exactly once (chunks of one file went through two relays, re-sent ones after later ones).
- A relay whose traffic is black-holed (no reset, no TCP ack: a `tc` drop filter on the loopback
  of a network namespace of the test's own): agents move within the documented bound,
  `ack_timeout` + back-off (fleet_blackhole.py, run under `unshare -n`)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import tron

TOPIC = "fleet"
AGENTS = 4
RATE = 200  # lines per second per agent
ACK_TIMEOUT_S = 30  # the shipped destinations.relay.ack_timeout


class Writer(threading.Thread):
    """Appends RATE lines per second (in 10 slices) to one agent's file; seqs agent * 10^7 + n."""

    def __init__(self, path, agent):
        super().__init__(daemon=True)
        self.path, self.base = path, agent * 10_000_000
        self.halt = threading.Event()
        self.written = []  # (time, seq) of each slice's last line

    def run(self):
        n = 0
        while not self.halt.is_set():
            now = time.time()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % int(now % 1 * 1000)
            with open(self.path, "a") as f:
                for _ in range(RATE // 10):
                    f.write(json.dumps({"time": stamp, "seq": self.base + n, "msg": "f" * 80}) + "\n")
                    n += 1
            self.written.append((time.time(), self.base + n - 1))
            self.halt.wait(0.1)

    def stop(self):
        """Stops writing and waits for the slice in progress: `count()` is final only after it
        (read at once after `halt.set()`, it missed a slice being written, whose 20 lines then
        reached GCS as "unexpected")."""
        self.halt.set()
        self.join()

    def count(self):
        return self.written[-1][1] - self.base + 1 if self.written else 0

    def seqs_between(self, t0, t1):
        """Seqs of lines written in [t0, t1)."""
        prev_end = None
        out = []
        for t, last in self.written:
            first = self.base if prev_end is None else prev_end + 1
            if t0 <= t < t1:
                out.extend(range(first, last + 1))
            prev_end = last
        return out


def fleet_relays(work, certs, brokers, topic, count=2):
    """`count` relays at the shipped limits and delivery timeout (25 s, below the agents' 30 s
    ack_timeout), each with its own dead-letter file."""
    relays = []
    for i in range(count):
        cfg = tron.relay_config(work, certs, brokers, topic=topic)
        del cfg["kafka"]["delivery_timeout"]
        cfg["dead_letter"]["path"] = os.path.join(work, "dead-letter-%d.ndjson" % i)
        relays.append(tron.Proc("relay%d" % (i + 1), "tron-relay", cfg, work))
    return relays


def fleet_agents(work, certs, relays, count, host_prefix):
    """`count` agents at the shipped file, batch and ack settings, each given every relay, each
    with its own file and a Writer for it (not started)."""
    agents, writers = [], []
    for i in range(count):
        logs = os.path.join(work, "logs%d" % i)
        os.makedirs(logs)
        cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3-%d" % i),
                                relays[0].config["listen"], certs, host="%s-%d" % (host_prefix, i),
                                state_dir=os.path.join(work, "state%d" % i))
        del cfg["files"]
        relay_dest = cfg["destinations"]["relay"]
        relay_dest["addresses"] = [r.config["listen"] for r in relays]
        del relay_dest["ack_timeout"], relay_dest["batch"]
        del cfg["destinations"]["s3"]["batch"]
        agents.append(tron.Proc("agent%d" % i, "tron-agent", cfg, work))
        writers.append(Writer(os.path.join(logs, "app.log"), i))
    return agents, writers


def fleet(services, certs, workroot, procs, name):
    work = os.path.join(workroot, name)
    os.makedirs(work)
    topic = name
    services.create_topic(topic, 4)
    services.create_gcs_bucket(topic)
    relays = fleet_relays(work, certs, services.kafka_brokers, topic)
    sink = tron.Proc("sink", "tron-sink-secor", tron.sink_config(
        work, services.kafka_brokers, "gs://%s/w" % topic, gcs_endpoint=services.gcs_endpoint, topic=topic,
        group=topic), work)
    agents, writers = fleet_agents(work, certs, relays, AGENTS, name)
    procs.extend(relays + [sink] + agents)
    for p in relays + [sink] + agents:
        p.start()
    return work, relays, sink, agents, writers


def delivered(relay):
    return relay.metric("tron_relay_records_delivered_total") or 0


def shares_over(relays, seconds):
    before = [delivered(r) for r in relays]
    time.sleep(seconds)
    after = [delivered(r) for r in relays]
    got = [a - b for a, b in zip(after, before)]
    total = sum(got)
    return got, [g / total for g in got] if total else [0 for _ in got]


def kafka_seqs(brokers, topic, settle=1.0):
    """Every `seq` in the topic up to its end as of the call (read while writers keep writing:
    reading to the partitions' end offsets then `settle` seconds more, as Tansu's reported end
    offset can stop short of the last batch)."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": brokers, "group.id": "fleet-check-%f" % time.time(),
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
        c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        reached = {p: end <= 0 for p, end in ends.items()}
        seqs = set()
        deadline, settle_until = time.time() + 120, None
        while time.time() < deadline and (settle_until is None or time.time() < settle_until):
            for m in c.consume(2000, timeout=0.5):
                if m.error() or m.value() is None:
                    continue
                if m.offset() >= ends[m.partition()] - 1:
                    reached[m.partition()] = True
                try:
                    rec = json.loads(m.value())
                except ValueError:
                    continue
                if isinstance(rec, dict) and "seq" in rec:
                    seqs.add(rec["seq"])
            if settle_until is None and all(reached.values()):
                settle_until = time.time() + settle
        return seqs
    finally:
        c.close()


def gcs_seqs_exactly_once(services, topic, expected):
    """(every expected seq once and nothing else, rows, distinct seqs, what differs)."""
    rows = tron.gcs_csv_rows(services, topic, "w/%s/" % topic)
    seqs = [int(r[3]) for r in rows]
    got = set(seqs)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    return len(seqs) == len(expected) and got == expected, len(seqs), len(got), \
        "%d expected, %d missing %s, %d unexpected %s" % (len(expected), len(missing), missing[:10],
                                                          len(unexpected), unexpected[:10])


def test_agents_spread_over_two_relays_and_again_after_one_restarts(services, certs, workroot, procs):
    work, relays, sink, agents, writers = fleet(services, certs, workroot, procs, "fleet-spread")
    for w in writers:
        w.start()
    try:
        tron.wait_until("both relays delivering", lambda: all(delivered(r) > 0 for r in relays), timeout=60,
                        on_timeout=lambda: [a.tail(2000) for a in agents])
        got, shares = shares_over(relays, 60)
        print("\nminute 1: records per relay %s, shares %s" % (got, ["%.1f%%" % (100 * s) for s in shares]))
        assert all(0.40 <= s <= 0.60 for s in shares), (got, shares)
        connections = [r.metric("tron_relay_connections") for r in relays]
        assert connections == [AGENTS, AGENTS], connections  # every agent keeps both

        # r2 restarted (SIGTERM, start again on the same port): it gets its share back without
        # restarting any agent, in the minute that follows.
        assert relays[1].stop() == 0
        relays[1].start()
        got, shares = shares_over(relays, 60)
        print("minute after r2 restarted: records per relay %s, shares %s" % (
            got, ["%.1f%%" % (100 * s) for s in shares]))
        assert all(0.40 <= s <= 0.60 for s in shares), (got, shares)
    finally:
        for w in writers:
            w.stop()
    expected = {s for w in writers for s in range(w.base, w.base + w.count())}
    tron.wait_until("every line in GCS exactly once", lambda: gcs_seqs_exactly_once(services, "fleet-spread",
                                                                                      expected)[0],
                    timeout=180, interval=3, on_timeout=lambda: gcs_seqs_exactly_once(services, "fleet-spread",
                                                                                       expected))


def test_a_hung_relay_is_left_and_every_line_lands_once(services, certs, workroot, procs):
    work, relays, sink, agents, writers = fleet(services, certs, workroot, procs, "fleet-hung")
    for w in writers:
        w.start()
    try:
        tron.wait_until("both relays delivering", lambda: all(delivered(r) > 0 for r in relays), timeout=60)
        time.sleep(5)
        relays[0].proc.send_signal(signal.SIGSTOP)
        t0 = time.time()
        time.sleep(60)
        t1 = time.time()
        # Judged before r1 resumes: what reached Kafka went through r2.
        in_kafka = kafka_seqs(services.kafka_brokers, "fleet-hung")
        during = [s for w in writers for s in w.seqs_between(t0, t1 - 1)]
        arrived = sum(1 for s in during if s in in_kafka)
        timeouts = sum(a.metric("tron_agent_send_retries_total", destination="relay", reason="ack_timeout") or 0
                       for a in agents)
        print("\nr1 stopped 60 s: %d of %d lines written meanwhile in Kafka before it resumed (%.1f%%); "
              "%d chunks given up on r1 after ack_timeout" % (arrived, len(during), 100 * arrived / len(during),
                                                             timeouts))
        assert arrived >= 0.95 * len(during), (arrived, len(during))
        relays[0].proc.send_signal(signal.SIGCONT)
        time.sleep(10)
    finally:
        relays[0].proc.send_signal(signal.SIGCONT)
        for w in writers:
            w.stop()
    expected = {s for w in writers for s in range(w.base, w.base + w.count())}
    ok = tron.wait_until("every line in GCS exactly once", lambda: (lambda r: r if r[0] else None)(
        gcs_seqs_exactly_once(services, "fleet-hung", expected)), timeout=240, interval=3,
        on_timeout=lambda: gcs_seqs_exactly_once(services, "fleet-hung", expected))
    dropped = sink.metric("tron_sink_duplicates_dropped_total", topic="fleet-hung") or 0
    print("GCS: %d rows for %d lines, %d re-sent copies dropped by the sink" % (ok[1], len(expected), dropped))


def test_a_black_holed_relay_is_left_within_the_documented_bound(certs, workroot):
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -n` (root or CAP_SYS_ADMIN) for a network namespace of its own")
    if subprocess.run(["tc", "-V"], capture_output=True).returncode != 0:
        pytest.skip("needs `tc` (iproute2) to black-hole a port")
    work = os.path.join(workroot, "fleet-blackhole")
    os.makedirs(work)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fleet_blackhole.py")
    r = subprocess.run(["unshare", "-n", sys.executable, script, work, json.dumps(certs)], capture_output=True,
                       text=True, timeout=600)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["moved_after_s"] <= 2 * ACK_TIMEOUT_S, result
    assert result["ack_timeouts"] > 0, result  # chunks were stuck on r1 and moved, not only new ones
    assert result["missing_at_end"] == 0, result


def test_watermarks_of_20000_hosts_through_one_relay_reach_the_sink_in_bounded_messages(services, certs, workroot,
                                                                                        procs):
    """20,000 simulated hosts report through one relay (a Forward client sending `tron.watermark`
    chunks of 1,000 reports): every watermark message the relay writes holds at most 5,000 hosts
    and stays far below Kafka's 1 MB `message.max.bytes`, and the sink knows all 20,000 hosts:
    each of them holds back the hour their watermark is in."""
    import datetime
    import socket

    import msgpack
    topic = "fleet-20k"
    work = os.path.join(workroot, topic)
    relay, sink, host, port = tron.relay_to_gcs(services, certs, work, procs, topic, topic, 2, plaintext=True)
    hour = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0) - \
        datetime.timedelta(hours=2)
    inside = int((hour + datetime.timedelta(minutes=10)).timestamp() * 1000)
    def event_time(seconds):
        return msgpack.ExtType(0, int(seconds).to_bytes(4, "big") + b"\0\0\0\0")

    def frame(tag, records, chunk, at=None):
        ts = event_time(at or time.time())
        entries = b"".join(msgpack.packb([ts, r]) for r in records)
        return msgpack.packb([tag, entries, {"chunk": chunk, "size": len(records)}])
    s = socket.create_connection((host, port))
    unpacker = msgpack.Unpacker(raw=False)
    # One data record in the hour, so the hour exists in the sink.
    frames = [frame("app.log", [{"seq": 1, "msg": "one"}], "data", at=inside / 1000)]
    frames += [frame("tron.watermark", [{"host": "sim-%05d" % (c * 1000 + i), "watermark_ms": inside,
                                          "tags": ["app.log"]} for i in range(1000)], "wm-%d" % c) for c in range(20)]
    for f in frames:
        s.sendall(f)
    acks = 0
    while acks < len(frames):
        data = s.recv(65536)
        assert data, "relay closed the connection after %d acks" % acks
        unpacker.feed(data)
        acks += sum(1 for _ in unpacker)
    s.close()
    assert relay.metric("tron_relay_watermark_reports_total") == 20_000
    # One interval's worth (4 messages of 5,000 hosts for each of 2 partitions) written first.
    tron.wait_until("the relay's watermark messages", lambda: (relay.metric("tron_relay_watermark_messages_total")
                                                              or 0) >= 8, timeout=60, interval=1)
    messages = tron.watermark_messages(services.kafka_brokers, topic, quiet=6, limit=20)
    sizes = [len(json.dumps(v)) for _, _, v in messages]
    per_message = [len(v["tron_watermarks"]) for _, _, v in messages]
    hosts_p0 = set().union(*[v["tron_watermarks"].keys() for p, _, v in messages if p == 0])
    print("\n20,000 hosts: %d watermark messages, at most %d hosts and %d bytes each; partition 0 carries %d hosts"
          % (len(messages), max(per_message), max(sizes), len(hosts_p0)))
    assert max(per_message) <= 5000 and max(sizes) < 500_000, (max(per_message), max(sizes))
    assert len({h for h in hosts_p0 if h.startswith("sim-")}) == 20_000
    holding = tron.wait_until("the sink to count 20,000 hosts holding the hour", lambda: (
        lambda v: v if v and v >= 20_000 else None)(sink.metric("tron_sink_hosts_holding_hours", topic=topic)),
        timeout=120, interval=2, on_timeout=sink.tail)
    r = subprocess.run([os.path.join(tron.BIN, "tron-sink-secor"), "--config", sink.config_path, "hours", "--topic",
                        topic, "--json"], capture_output=True, text=True, timeout=60)
    hours = [json.loads(line) for line in r.stdout.splitlines()]
    waiting = [h for h in hours if h["hour"] == hour.strftime("%Y-%m-%dT%H")]
    print("sink: %d hosts hold the hour back (gauge); `hours --json` lists %d for %s"
          % (holding, len(waiting[0]["holding"]) if waiting else -1, hour.strftime("%Y-%m-%dT%H")))
    assert waiting and not waiting[0]["finalized"] and len(waiting[0]["holding"]) == 20_000, r.stdout[:2000]
