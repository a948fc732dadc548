"""A destination that is down pauses only itself; the file is the buffer; memory stays bounded.
TRON_OUTAGE_SECONDS sets the outage (the issue's full variant: 30)."""
import datetime
import json
import os
import threading
import time

import tron

OUTAGE = int(os.environ.get("TRON_OUTAGE_SECONDS", "10"))


def write_steadily(path, total):
    """`total` JSON lines at 3,000 lines/s, timed an hour ago, one millisecond apart."""
    base = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    with open(path, "a") as f:
        for seq in range(total):
            t = base + datetime.timedelta(milliseconds=seq)
            f.write(json.dumps({"time": t.isoformat().replace("+00:00", "Z"), "seq": seq, "msg": "o" * 150}) + "\n")
            if seq % 300 == 299:
                f.flush()
                time.sleep(0.1)


def test_relay_down_pauses_only_the_relay_destination_and_loses_nothing(services, certs, workroot, procs):
    work = os.path.join(workroot, "outage")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_topic("outage", 3)
    services.create_gcs_bucket("outage")
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, services.kafka_brokers, topic="outage"), work)
    sink_cfg = tron.sink_config(work, services.kafka_brokers, "gs://outage/w", gcs_endpoint=services.gcs_endpoint,
                                topic="outage", group="outage")
    sink_cfg["output"]["columns"] = [{"name": "seq", "source": "seq", "type": "INTEGER"}]
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
    s3_dir = os.path.join(work, "s3")
    agent = tron.Proc("agent", "tron-agent", tron.agent_config(
        work, os.path.join(logs, "*.log"), "file://" + s3_dir, relay.config["listen"], certs), work)
    procs.extend([relay, sink, agent])
    relay.start(), sink.start(), agent.start()

    total = 3000 * (OUTAGE + 6)
    w = threading.Thread(target=write_steadily, args=(os.path.join(logs, "a.log"), total))
    w.start()
    time.sleep(2)
    relay.kill()
    down_at = time.time()
    # While the relay is down the S3 archive keeps up: its lag stays small.
    time.sleep(OUTAGE / 2)
    s3_lag = float([l for l in agent.metrics().splitlines()
                    if l.startswith('tron_agent_destination_lag_bytes{destination="s3"}')][0].rsplit(" ", 1)[1])
    relay_lag = float([l for l in agent.metrics().splitlines()
                       if l.startswith('tron_agent_destination_lag_bytes{destination="relay"}')][0].rsplit(" ", 1)[1])
    assert agent.health()[0] == 503 and "relay" in json.dumps(agent.health()[1])
    time.sleep(max(0, OUTAGE - (time.time() - down_at)))
    relay.start()
    w.join()
    tron.wait_until("every line through the relay after a %ds outage" % OUTAGE,
                    lambda: len({int(r[0]) for r in tron.gcs_csv_rows(services, "outage", "w/outage/")}) >= total,
                    timeout=120, interval=2, on_timeout=lambda: agent.tail())
    rss = agent.peak_rss_mib()
    print("relay down %ds: s3 lag %.0f bytes, relay lag %.0f bytes mid-outage; agent peak RSS %.1f MiB; no loss"
          % (OUTAGE, s3_lag, relay_lag, rss))
    assert relay_lag > s3_lag
    assert rss < 150, "agent peak RSS %.1f MiB" % rss


def run_s3_outage(services, certs, workroot, procs, name, relay_too):
    """S3 unreachable (and the relay killed too when `relay_too`) for OUTAGE seconds while lines
    are written: nothing lost in either destination, /health names what is down, RSS bounded."""
    work = os.path.join(workroot, name)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_topic(name, 3)
    services.create_gcs_bucket(name)
    services.create_s3_bucket(name)
    gate = tron.Gate(services.s3_port).open()
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, services.kafka_brokers, topic=name), work)
    sink_cfg = tron.sink_config(work, services.kafka_brokers, "gs://%s/w" % name, gcs_endpoint=services.gcs_endpoint,
                                topic=name, group=name)
    sink_cfg["output"]["columns"] = [{"name": "seq", "source": "seq", "type": "INTEGER"}]
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
    agent_cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "s3://%s/archive" % name, relay.config["listen"],
                                  certs, s3_endpoint=gate.endpoint)
    agent = tron.Proc("agent", "tron-agent", agent_cfg, work, env=dict(tron.servers.S3_CREDENTIALS))
    procs.extend([relay, sink, agent])
    relay.start(), sink.start(), agent.start()

    total = 3000 * (OUTAGE + 6)
    w = threading.Thread(target=write_steadily, args=(os.path.join(logs, "a.log"), total))
    w.start()
    time.sleep(2)
    gate.close()
    if relay_too:
        relay.kill()
    down_at = time.time()
    tron.wait_until("agent /health 503 naming s3", lambda: (lambda h: h if h[0] == 503 and "s3" in
                                 json.dumps(h[1]) else None)(agent.health()), timeout=OUTAGE + 20, interval=0.5)
    time.sleep(max(0, OUTAGE - (time.time() - down_at)))
    gate.open()
    if relay_too:
        relay.start()
    w.join()
    tron.wait_until("every line in S3 after the outage", lambda: tron.s3_seqs(services, name) >= set(range(total)),
                    timeout=180, interval=3, on_timeout=agent.tail)
    tron.wait_until("every line through the relay", lambda: len({int(r[0]) for r in tron.gcs_csv_rows(
        services, name, "w/%s/" % name)}) >= total, timeout=180, interval=3, on_timeout=agent.tail)
    rss = agent.peak_rss_mib()
    print("%s down %ds: %d lines, none lost in S3 or via the relay; agent peak RSS %.1f MiB"
          % ("S3 and relay" if relay_too else "S3", OUTAGE, total, rss))
    assert rss < 150, "agent peak RSS %.1f MiB" % rss
    gate.close()


def test_s3_unreachable_pauses_only_the_archive_and_loses_nothing(services, certs, workroot, procs):
    run_s3_outage(services, certs, workroot, procs, "s3-outage", relay_too=False)


def test_s3_and_relay_down_together_lose_nothing(services, certs, workroot, procs):
    run_s3_outage(services, certs, workroot, procs, "both-outage", relay_too=True)
