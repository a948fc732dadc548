"""Sink correctness under rebalances, stalls and odd times (real Tansu, real fake-gcs-server).

Records are produced straight into Kafka by a real client (PyPI confluent-kafka), so every test
knows each record's partition and offset and can check that each is in exactly one object."""
import datetime
import json
import os
import signal
import subprocess
import threading
import time

import pytest
from confluent_kafka import Producer

import tron
from test_crash import assert_each_offset_in_exactly_one_object
from test_operations import NotifySocket

RESTARTS = int(os.environ.get("TRON_SINK_RESTARTS", "10"))
RESTART_EVERY = float(os.environ.get("TRON_SINK_RESTART_EVERY", "20"))
GCS_STALL = float(os.environ.get("TRON_GCS_STALL_SECONDS", "60"))
REBALANCES = int(os.environ.get("TRON_SINK_REBALANCES", "3"))

# The column order of test_crash's helpers: time, seq, partition, offset.
COLUMNS = [
    {"name": "time", "source": "@time", "type": "TIMESTAMP"},
    {"name": "seq", "source": "seq", "type": "INTEGER"},
    {"name": "kafka_partition", "source": "@partition", "type": "INTEGER"},
    {"name": "kafka_offset", "source": "@offset", "type": "INTEGER"},
]


class SteadyProducer(threading.Thread):
    """Produces {"seq": n} at `rate` records/s until stopped; `event_time` maps seq → event time
    (ns, sent as the relay does, in the `event_time_ns` header) or None for none."""

    def __init__(self, brokers, topic, rate, event_time=None, total=None):
        super().__init__(daemon=True)
        self.producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
        self.topic, self.rate, self.event_time, self.total = topic, rate, event_time, total
        self.sent = 0
        self.stopping = threading.Event()

    def run(self):
        start = time.time()
        while not self.stopping.is_set() and (self.total is None or self.sent < self.total):
            due = int((time.time() - start) * self.rate) + 1
            while self.sent < due and (self.total is None or self.sent < self.total):
                headers = []
                if self.event_time:
                    headers.append(("event_time_ns", str(self.event_time(self.sent)).encode()))
                self.producer.produce(self.topic, json.dumps({"seq": self.sent}).encode(), headers=headers)
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.01)
        assert self.producer.flush(30) == 0, "records left unproduced"

    def stop(self):
        self.stopping.set()
        self.join()
        return self.sent


def sink(work, services, topic, name, **roll):
    cfg = tron.sink_config(work, services.kafka_brokers, "gs://%s/w" % topic, gcs_endpoint=services.gcs_endpoint,
                           topic=topic, group=topic, name=name)
    cfg["output"]["columns"] = COLUMNS
    cfg["roll"].update(roll)
    return tron.Proc(name, "tron-sink-secor", cfg, work)


def setup(services, workroot, topic, partitions):
    work = os.path.join(workroot, topic)
    os.makedirs(work)
    services.create_topic(topic, partitions)
    services.create_gcs_bucket(topic)
    return work


def wait_for_every_record(services, topic, total, sinks, timeout=240):
    def all_in():
        return len({int(r[1]) for r in tron.gcs_csv_rows(services, topic, "w/%s/" % topic)}) >= total

    tron.wait_until("all %d records in GCS" % total, all_in, timeout=timeout, interval=3,
                    on_timeout=lambda: "".join(s.tail(60) for s in sinks))
    time.sleep(3)  # anything uploaded twice would land now
    rows = tron.gcs_csv_rows(services, topic, "w/%s/" % topic)
    per_record = assert_each_offset_in_exactly_one_object(rows)
    assert {int(r[1]) for r in rows} == set(range(total))
    assert len(rows) == total, "%d rows for %d records" % (len(rows), total)
    return per_record


def test_sinks_restarted_over_and_over_write_each_offset_exactly_once(services, workroot, procs):
    """3 sinks on 6 partitions under steady production; one is restarted every RESTART_EVERY
    seconds (alternately SIGTERM and kill -9), RESTARTS times."""
    topic = "churn"
    work = setup(services, workroot, topic, 6)
    sinks = [sink(work, services, topic, "sink-%d" % i, max_age="2s") for i in range(3)]
    procs.extend(sinks)
    for s in sinks:
        s.start()
    producer = SteadyProducer(services.kafka_brokers, topic, rate=300)
    producer.start()
    for i in range(RESTARTS):
        time.sleep(RESTART_EVERY)
        victim = sinks[i % 3]
        if i % 2:
            victim.kill()
        else:
            victim.stop()
        victim.start()
    total = producer.stop()
    per_record = wait_for_every_record(services, topic, total, sinks)
    fenced = sum(s.metric("tron_sink_fenced_total") or 0 for s in sinks)
    print("churn: %d restarts every %.0fs, %d records over 6 partitions, each in exactly one object; "
          "fenced writes refused: %d" % (RESTARTS, RESTART_EVERY, len(per_record), fenced))


def test_a_stalled_store_and_a_frozen_owner_neither_lose_nor_duplicate(services, workroot, procs):
    """2 sinks with max.poll.interval.ms 30 s. fake-gcs-server is frozen (SIGSTOP) for GCS_STALL
    seconds, longer than the poll interval; then one sink is frozen past its session time-out, so
    its partitions move, and thawed: a zombie with staged records. No offset may be missing or
    doubled, and no object may ever be rewritten with different content."""
    topic = "stall"
    work = setup(services, workroot, topic, 4)
    props = {"max.poll.interval.ms": "30000"}
    a = sink(work, services, topic, "sink-a", max_age="2s")
    b = sink(work, services, topic, "sink-b", max_age="2s")
    for s in (a, b):
        s.config["kafka"]["properties"] = props
        s.config["output"]["request_timeout"] = "10s"
        s.config["output"]["unhealthy_after"] = "5s"
        s.__init__(s.name, "tron-sink-secor", s.config, work)
    procs.extend([a, b])
    a.start(), b.start()
    producer = SteadyProducer(services.kafka_brokers, topic, rate=200)
    producer.start()
    contents, watching = {}, threading.Event()

    def watch():  # every version of every object seen, by CRC32C
        while not watching.is_set():
            try:
                for o in services.gcs_list(topic, "w/%s/" % topic):
                    contents.setdefault(o["name"], set()).add(o.get("crc32c"))
            except OSError:
                pass  # the store is frozen
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    gcs = services.servers["gcs"].proc
    time.sleep(8)
    os.kill(gcs.pid, signal.SIGSTOP)
    try:
        time.sleep(GCS_STALL / 2)
        health = a.health()
        time.sleep(GCS_STALL / 2)
    finally:
        os.kill(gcs.pid, signal.SIGCONT)
    print("sink-a health during the GCS stall: %s" % (health,))
    assert health[0] == 503 and "gcs" in json.dumps(health[1]), health
    time.sleep(10)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(25)  # past session.timeout.ms (10 s): b takes a's partitions
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    time.sleep(10)
    total = producer.stop()
    per_record = wait_for_every_record(services, topic, total, [a, b])
    watching.set()
    watcher.join()
    rewritten = {name: crcs for name, crcs in contents.items() if len(crcs) > 1}
    assert not rewritten, "objects rewritten with different content: %s" % rewritten
    print("stall: GCS frozen %.0fs, sink-a frozen 25s; %d records, each in exactly one object; %d objects, none "
          "rewritten differently; fenced: a=%s b=%s" % (GCS_STALL, len(per_record), len(contents),
                                                       a.metric("tron_sink_fenced_total"),
                                                       b.metric("tron_sink_fenced_total")))


def test_a_store_stall_longer_than_the_watchdog_does_not_get_the_sink_killed(services, workroot, procs):
    """The shipped unit has WatchdogSec=30s and output.request_timeout defaults to 120 s: a store call
    that waits through a 70 s GCS stall must not read as a loop that stopped turning (systemd would
    kill the sink, and it would restart into the same stall). sd_notify as systemd sets it up."""
    topic = "watchdog-stall"
    work = setup(services, workroot, topic, 2)
    notify = NotifySocket(os.path.join(work, "notify.sock"))
    s = sink(work, services, topic, "sink")  # output.request_timeout at its default
    s.__init__(s.name, "tron-sink-secor", s.config, work,
               env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "30000000"})
    procs.append(s)
    s.start()
    producer = SteadyProducer(services.kafka_brokers, topic, rate=100)
    producer.start()
    pings, stop = [], threading.Event()

    def collect():
        while not stop.is_set():
            before = len(notify.messages)
            notify.drain()
            pings.extend(time.time() for m in notify.messages[before:] if "WATCHDOG=1" in m.split("\n"))
    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    time.sleep(8)
    gcs = services.servers["gcs"].proc
    stall = max(GCS_STALL, 70)
    os.kill(gcs.pid, signal.SIGSTOP)
    started = time.time()
    try:
        time.sleep(stall)
    finally:
        os.kill(gcs.pid, signal.SIGCONT)
    ended = time.time()
    time.sleep(5)
    stop.set()
    collector.join()
    during = [t for t in pings if started <= t <= ended]
    marks = [started] + during + [ended]
    longest = max(b - a for a, b in zip(marks, marks[1:]))
    total = producer.stop()
    per_record = wait_for_every_record(services, topic, total, [s])
    print("watchdog: GCS frozen %.0fs, request_timeout at its default; %d pings meanwhile, longest gap %.1fs "
          "(systemd kills after 30s); %d records afterwards, each in one object" % (stall, len(during), longest,
                                                                                 len(per_record)))
    assert longest < 30, "the watchdog would have killed the sink during the stall: %s" % [m - started for m in marks]
    assert s.running()


def test_a_full_staging_directory_is_reported_and_loses_nothing(services, workroot, procs):
    topic = "fullstage"
    work = setup(services, workroot, topic, 2)
    staging = os.path.join(work, "small-staging")
    os.makedirs(staging)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", staging]).returncode:
        pytest.skip("needs root to mount a small tmpfs as the staging directory")
    try:
        s = sink(work, services, topic, "sink", max_age="30s", idle_after="30s")
        s.config["staging_dir"] = staging
        s.config["output"]["columns"] = COLUMNS + [{"name": "pad", "source": "pad", "type": "STRING"}]
        s.__init__(s.name, "tron-sink-secor", s.config, work)
        procs.append(s)
        s.start()
        # Hard-to-compress records: 256 KiB of staging holds a few hundred of them.
        producer = Producer({"bootstrap.servers": services.kafka_brokers})

        def produce(first, count, partition):
            for i in range(first, first + count):
                value = json.dumps({"seq": i, "pad": os.urandom(600).hex()}).encode()
                producer.produce(topic, value, partition=partition)
            assert producer.flush(30) == 0

        produce(0, 5900, 0)
        tron.wait_until("the sink reports staging down", lambda: s.health()[0] == 503
                        and "staging" in json.dumps(s.health()[1]), timeout=60, interval=0.5,
                        on_timeout=lambda: s.tail(40))
        print("health while staging is full: %s" % (s.health(),))
        assert "No space left on device" in s.tail(100000), s.tail(40)
        # Partition 0 was given up and its file deleted; for the next 15 s it is left alone. Now
        # partition 1 gets 100 records and then nothing: its staging file is in the tmpfs when
        # that goes away, so its idle cut fails after recording its intent, and the cut must be
        # replayed from offset 0 with no newer record to prompt it.
        produce(5900, 100, 1)
        tron.wait_until("partition 1 staged", lambda: any(n.startswith(topic + "-1-") for n in os.listdir(staging)),
                        timeout=10, interval=0.1, on_timeout=lambda: s.tail(40))
    finally:
        subprocess.run(["umount", "-l", staging])
    # Space returns (the staging directory is now the roomy parent filesystem): everything lands.
    per_record = wait_for_every_record(services, topic, 6000, [s], timeout=180)
    assert "replaying an interrupted cut" in s.tail(400), s.tail(40)
    print("full staging: 503 with the reason, then %d records each in exactly one object" % len(per_record))


def hour_start(hours_ago):
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=hours_ago)


def test_odd_event_times_are_quarantined_and_hours_finalize_exactly(services, workroot, procs):
    topic = "oddtime"
    work = setup(services, workroot, topic, 3)
    s = sink(work, services, topic, "sink")
    procs.append(s)
    s.start()
    hour = hour_start(2)
    base_ns = int(hour.timestamp() * 1e9)
    year_2100, year_1970 = 4102444800 * 10**9, 60 * 10**9

    def event_time(seq):
        if seq == 100:
            return year_2100
        if seq == 200:
            return year_1970
        return base_ns + seq * 10**9  # 600 records over ten minutes of the hour

    producer = SteadyProducer(services.kafka_brokers, topic, rate=5000, event_time=event_time, total=602)
    producer.start()
    producer.join()
    prefix = "w/%s/dt=%s/hr=%s/" % (topic, hour.strftime("%Y-%m-%d"), hour.strftime("%H"))

    def success():
        names = {o["name"] for o in services.gcs_list(topic, prefix)}
        if prefix + "_SUCCESS" not in names:
            return None
        # At first sight: what a loader would read now.
        manifest = json.loads(services.gcs_get(topic, prefix + "_manifest.json"))
        rows = sum(len(tron.read_gz_lines(services.gcs_get(topic, o["name"]))) for o in manifest["objects"])
        return manifest, rows

    manifest, rows = tron.wait_until("_SUCCESS for the hour", success, timeout=90, interval=0.25,
                                     on_timeout=lambda: s.tail(40))
    assert manifest["rows"] == 600 and rows == 600, (manifest["rows"], rows)
    listed = [o["name"] for o in services.gcs_list(topic, "")]
    assert not [n for n in listed if "dt=2100" in n or "dt=1970" in n and "_tron/quarantine" not in n], listed
    quarantined = [n for n in listed if n.startswith("w/_tron/quarantine/%s/" % topic)]
    reasons = sorted(n.split("reason=")[1].split("/")[0] for n in quarantined)
    assert reasons == ["too_new", "too_old"], quarantined
    assert s.metric("tron_sink_records_quarantined_total", topic=topic, reason="too_new") == 1
    assert s.metric("tron_sink_records_quarantined_total", topic=topic, reason="too_old") == 1
    print("odd times: 600 rows in the hour at _SUCCESS, quarantined: %s" % quarantined)


def drain_backlog(services, workroot, topic, total, event_time):
    """Produces `total` records first, then starts a sink on them: returns the sink's CPU-seconds
    and wall-clock seconds until every record is in an object, and its number of cuts."""
    work = setup(services, workroot, topic, 1)
    SteadyProducer(services.kafka_brokers, topic, rate=50000, total=total, event_time=event_time).run()
    s = sink(work, services, topic, "sink", max_age="60s", idle_after="5s")
    s.start()
    try:
        started = time.time()
        tron.wait_until("%s: %d records uploaded" % (topic, total),
                        lambda: (s.metric("tron_sink_records_uploaded_total", topic=topic) or 0) >= total,
                        timeout=300, interval=0.5, on_timeout=s.tail)
        cpu, wall = s.cpu_seconds(), time.time() - started
        wait_for_every_record(services, topic, total, [s])
        return cpu, wall, s.metric("tron_sink_cuts_total", topic=topic)
    finally:
        s.stop()


def test_an_old_hour_interleaved_with_the_current_one_does_not_cut_at_every_switch(services, workroot, procs):
    """The same backlog twice: every record in the current hour, then every other record in an
    hour three hours back. Without pacing every switch between the two hours is a cut (about
    `total`); with it, one per roll.min_interval (10 s) plus the idle cut at the end, and the work
    per record stays within 2x of the plain case (compared in sink CPU-seconds, the same work on
    the same machine, rather than in wall-clock time)."""
    total = 50000
    old_ns = int(hour_start(3).timestamp() * 1e9)
    plain = drain_backlog(services, workroot, "plain", total, lambda seq: time.time_ns())
    mixed = drain_backlog(services, workroot, "interleave", total,
                          lambda seq: old_ns + seq if seq % 2 else time.time_ns())
    print("backlog of %d records: plain %.2f CPU-s, %.1f s, %d cuts; interleaved hours %.2f CPU-s, %.1f s, "
          "%d cuts" % ((total,) + plain + mixed))
    cuts_bound = 2 + mixed[1] / 10
    assert mixed[2] <= cuts_bound, "%d cuts in %.1fs" % (mixed[2], mixed[1])
    assert mixed[0] <= 2 * plain[0], "interleaved hours cost %.2f CPU-s, the plain case %.2f" % (mixed[0], plain[0])


def test_partitions_given_back_to_their_owner_by_a_rebalance_lose_nothing(services, workroot, procs):
    """One sink owns every partition of its topic and reads ahead of its last commit (records
    staged, not yet cut) when another member joins its group for another topic, again and again:
    each eager rebalance revokes the sink's partitions and gives them straight back. librdkafka
    may go on from its own fetch position rather than the committed offset (librdkafka#1802);
    records between the two must still reach an object, once. GCS is frozen around each join, so
    a cut is uploading (and then commits) while the group rebalances."""
    from confluent_kafka import Consumer

    topic, other = "giveback", "giveback-other"
    work = setup(services, workroot, topic, 3)
    services.create_topic(other, 1)
    s = sink(work, services, topic, "sink", max_age="3s", idle_after="3s")
    procs.append(s)
    s.start()
    producer = SteadyProducer(services.kafka_brokers, topic, rate=500)
    producer.start()
    gcs = services.servers["gcs"].proc
    time.sleep(8)
    for _ in range(REBALANCES):
        os.kill(gcs.pid, signal.SIGSTOP)
        try:
            time.sleep(5)  # past roll.max_age: a cut is waiting on its upload
            joiner = Consumer({"bootstrap.servers": services.kafka_brokers, "group.id": topic,
                               "session.timeout.ms": 10000, "auto.offset.reset": "earliest"})
            joiner.subscribe([other])
            deadline = time.time() + 3
            while time.time() < deadline:
                joiner.poll(0.2)
        finally:
            os.kill(gcs.pid, signal.SIGCONT)
        deadline = time.time() + 5
        while time.time() < deadline:
            joiner.poll(0.2)
        joiner.close()  # leaves the group: one more rebalance
        time.sleep(4)
    total = producer.stop()
    per_record = wait_for_every_record(services, topic, total, [s])
    rewinds = s.metric("tron_sink_rewinds_total", topic=topic) or 0
    print("given back: %d rebalances, %d records over 3 partitions, each in exactly one object; "
          "rewinds to the committed offset: %d" % (2 * REBALANCES, len(per_record), rewinds))
