"""`_SUCCESS` means every line of the hour, at the moment it appears (issue 11): a 3-hour backlog
written into several files on two agents at once, one agent's link to the relay cut for 60 s while
it still has lines to send. Each `_SUCCESS` is read the moment it is listed; its manifest must hold
exactly the lines written for that hour, and no hour may need a second revision."""
import datetime
import json
import os
import random
import time
from collections import Counter

import tron

HOURS = 3
LINES_PER_AGENT = 60_000
FILES_PER_AGENT = 3


def write_backlog(logs, host, now):
    """Lines with event times spread over the last HOURS hours (until 10 min ago), in time order
    within each file; returns Counter(hour dir → lines)."""
    os.makedirs(logs, exist_ok=True)
    start = now - datetime.timedelta(hours=HOURS)
    span = (HOURS * 3600 - 600) * 1000  # ms
    per_hour = Counter()
    rng = random.Random(host)
    files = [open(os.path.join(logs, "app-%d.log" % i), "w") for i in range(FILES_PER_AGENT)]
    times = sorted(rng.randrange(span) for _ in range(LINES_PER_AGENT))
    for seq, ms in enumerate(times):
        t = start + datetime.timedelta(milliseconds=ms)
        line = {"time": t.isoformat().replace("+00:00", "Z"), "host": host, "seq": seq, "msg": "b" * 120}
        files[seq % FILES_PER_AGENT].write(json.dumps(line) + "\n")
        per_hour[t.strftime("dt=%Y-%m-%d/hr=%H")] += 1
    for f in files:
        f.close()
    return per_hour


def agent(work, services, certs, relay_address, host):
    cfg = tron.agent_config(work, os.path.join(work, "logs", "*.log"), "file://" + os.path.join(work, "s3"),
                            relay_address, certs, host=host)
    relay = cfg["destinations"]["relay"]
    relay["watermark_interval"] = "1s"
    # Small batches, one at a time: the agent is still sending when its link is cut.
    relay["batch"].update(max_bytes=32 << 10, max_inflight=1)
    return tron.Proc("agent-" + host, "tron-agent", cfg, work)


def test_success_appears_only_with_every_line_of_the_hour_after_a_backlog(services, certs, workroot, procs):
    work = os.path.join(workroot, "complete")
    os.makedirs(work)
    topic = bucket = "complete"
    services.create_topic(topic, 3)
    services.create_gcs_bucket(bucket)
    relay_cfg = tron.relay_config(work, certs, services.kafka_brokers, topic=topic)
    relay_cfg["kafka"]["watermark_interval"] = "1s"
    relay = tron.Proc("relay", "tron-relay", relay_cfg, work)
    sink_cfg = tron.sink_config(work, services.kafka_brokers, "gs://%s/w" % bucket, gcs_endpoint=services.gcs_endpoint,
                                topic=topic, group=topic)
    sink_cfg["finalize"] = {"lateness": "1m", "interval": "1s"}
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
    procs.extend([relay, sink])
    relay.start(), sink.start()

    now = datetime.datetime.now(datetime.timezone.utc)
    expected = Counter()
    for host in ("app-a", "app-b"):
        expected += write_backlog(os.path.join(work, host, "logs"), host, now)
    gate = tron.Gate(int(relay.config["listen"].rsplit(":", 1)[1])).open()
    a = agent(os.path.join(work, "app-a"), services, certs, relay.config["listen"], "app-a")
    b = agent(os.path.join(work, "app-b"), services, certs, "127.0.0.1:%d" % gate.port, "app-b")
    procs.extend([a, b])
    a.start(), b.start()

    # Cut b off once it has reported a watermark while lines are still unsent.
    def b_reported_midway():
        sent = b.metric("tron_agent_records_sent_total", destination="relay") or 0
        reported = b.metric("tron_agent_watermarks_sent_total") or 0
        return reported >= 1 and 0 < sent < LINES_PER_AGENT
    tron.wait_until("agent b reporting a watermark midway", b_reported_midway, timeout=60, interval=0.1,
                    on_timeout=lambda: "b sent %s records, reported %s watermarks\n%s" % (
                        b.metric("tron_agent_records_sent_total", destination="relay"),
                        b.metric("tron_agent_watermarks_sent_total"), b.tail()))
    gate.close()
    closed_at = time.time()

    watch = tron.SuccessWatch(services, bucket, topic)
    seen = {}  # hour dir → (seconds after the cut-off, manifest rows, revision, completeness) at first sight

    def look():
        for hour, (rows, revision, completeness) in watch.look().items():
            seen.setdefault(hour, (watch.at[hour] - (closed_at - watch.started), rows, revision, completeness))

    while time.time() - closed_at < 60:
        look()
        time.sleep(0.3)
    finalized_while_closed = dict(seen)
    gate.open()
    past_hours = [h for h in expected if h < now.strftime("dt=%Y-%m-%d/hr=%H")]

    def all_past_hours_final():
        look()
        return all(h in seen for h in past_hours)
    tron.wait_until("_SUCCESS for every past hour", all_past_hours_final, timeout=180, interval=0.3,
                    on_timeout=lambda: "seen %s\n%s" % (seen, sink.tail()))
    for hour, (after, rows, revision, completeness) in sorted(seen.items()):
        print("%s: _SUCCESS %.1fs after the cut-off, %d rows (written %d), %s" % (hour, after, rows, expected[hour],
                                                                               completeness))
    wrong = {h: (v[1], expected[h]) for h, v in seen.items() if v[1] != expected[h]}
    assert not wrong, "manifests at first sight (rows, written): %s" % wrong
    assert all(v[2] == 1 for v in seen.values()), seen
    assert all(v[3]["rule"] == "watermarks" and v[3]["hosts_complete"] == ["app-a", "app-b"] for v in seen.values()), seen
    # b's unsent lines held their hours back while it was cut off.
    assert len(finalized_while_closed) < len(past_hours), finalized_while_closed
    gate.close()
