"""Time and outages (issue 24), through agent -> relay -> Kafka -> sink -> GCS: a relay outage
longer than `finalize.host_timeout` (the relay stopped with SIGSTOP, or killed and started again)
never yields `_SUCCESS` for an hour whose rows are not all there, judged the moment `_SUCCESS`
first appears; and lines dated 2100 and 1970 are quarantined on the real path (the relay stamps
Kafka records with their receive time), with no effect on the other hours."""
import datetime
import json
import os
import signal
import subprocess
import time

import pytest

import tron

HOST_TIMEOUT_S = 20  # short here; the shipped 10 min runs behind TRON_LONG_OUTAGE (below)


def hour_start(hours_ago):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (now - datetime.timedelta(hours=hours_ago)).replace(minute=0, second=0, microsecond=0)


def write(path, times, first_seq):
    with open(path, "a") as f:
        for i, t in enumerate(times):
            f.write(json.dumps({"time": t.isoformat().replace("+00:00", "Z"), "seq": first_seq + i,
                                "msg": "o" * 60}) + "\n")


def pipeline(services, certs, workroot, procs, name, host_timeout):
    work = os.path.join(workroot, name)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_topic(name, 3)
    services.create_gcs_bucket(name)
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, services.kafka_brokers, topic=name), work)
    sink_cfg = tron.sink_config(work, services.kafka_brokers, "gs://%s/w" % name, gcs_endpoint=services.gcs_endpoint,
                                topic=name, group=name)
    sink_cfg["finalize"] = {"lateness": "5s", "interval": "1s", "host_timeout": host_timeout}
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3"),
                            relay.config["listen"], certs, host=name + "-host")
    del cfg["files"]  # the shipped defaults
    for dest in cfg["destinations"].values():
        del dest["batch"]
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.extend([relay, sink, agent])
    relay.start(), sink.start(), agent.start()
    return work, logs, relay, sink, agent


def hours_command(sink, topic):
    r = subprocess.run([os.path.join(tron.BIN, "tron-sink-secor"), "--config", sink.config_path, "hours",
                        "--topic", topic], capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("how", ["sigstop", "kill"])
def test_a_relay_outage_longer_than_host_timeout_never_finalizes_an_incomplete_hour(how, services, certs, workroot,
                                                                                      procs):
    long_outage = os.environ.get("TRON_LONG_OUTAGE")  # "1": the shipped 10 min host_timeout, 20 min outage
    host_timeout = 600 if long_outage else HOST_TIMEOUT_S
    topic = "outage-" + how
    work, logs, relay, sink, agent = pipeline(services, certs, workroot, procs, topic, "%ds" % host_timeout)
    h = hour_start(2)
    first = [h + datetime.timedelta(seconds=0.5 * i) for i in range(3000)]  # minutes 0-25
    second = [h + datetime.timedelta(minutes=30, seconds=0.5 * i) for i in range(3000)]  # minutes 30-55
    path = os.path.join(logs, "app.log")
    write(path, first, 0)
    tron.wait_until("the first half in Kafka", lambda: (agent.metric("tron_agent_records_sent_total",
                                                                     destination="relay") or 0) >= 3000,
                    timeout=60, interval=0.3, on_timeout=agent.tail)
    # The sink knows the host from its reports (what `hours` shows) before the relay goes out.
    tron.wait_until("the host's reports in the sink's state", lambda: topic + "-host" in hours_command(sink, topic)[1],
                    timeout=60, interval=1, on_timeout=lambda: hours_command(sink, topic)[1])
    if how == "sigstop":
        relay.proc.send_signal(signal.SIGSTOP)
    else:
        relay.kill()
    write(path, second, 3000)  # the rest of the hour, while the relay is out
    watch = tron.SuccessWatch(services, topic, topic)
    outage = 2 * host_timeout + 5
    started = time.time()
    hours_output = None
    while time.time() - started < outage:
        watch.look()
        if hours_output is None and time.time() - started > host_timeout + 5:
            hours_output = hours_command(sink, topic)
        time.sleep(0.5)
    during = dict(watch.seen)
    print("tron-sink-secor hours --topic %s during the outage (exit %d):\n%s" % (topic, hours_output[0],
                                                                              hours_output[1]))
    silent = tron.metric(sink.metrics(), "tron_sink_all_hosts_silent", topic=topic)
    if how == "sigstop":
        relay.proc.send_signal(signal.SIGCONT)
    else:
        relay.start()
    hour = h.strftime("dt=%Y-%m-%d/hr=%H")
    tron.wait_until("_SUCCESS after the outage", lambda: hour in watch.look(), timeout=180, interval=0.3,
                    on_timeout=sink.tail)
    rows, revision, completeness = watch.seen[hour]
    print("%s: outage %ds with host_timeout %ds: _SUCCESS during it: %s; after it: %d rows of 6000, revision %d, %s"
          % (how, outage, host_timeout, during, rows, revision, completeness))
    assert not during, "an hour finalized while the relay was out: %s" % during
    assert silent == 1, "the sink says every host is silent"
    assert hours_output[0] == 0 and "no" in hours_output[1] and topic + "-host" in hours_output[1], hours_output
    assert (rows, revision) == (6000, 1), watch.seen[hour]
    assert agent.stop() == 0


def test_lines_dated_2100_and_1970_are_quarantined_and_do_not_hold_or_move_other_hours(services, certs, workroot,
                                                                                       procs):
    topic = "odd-times"
    work, logs, relay, sink, agent = pipeline(services, certs, workroot, procs, topic, "%ds" % HOST_TIMEOUT_S)
    h = hour_start(2)
    times = [h + datetime.timedelta(seconds=3 * i) for i in range(1000)]
    times.insert(500, datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc))
    times.insert(700, datetime.datetime(1970, 1, 1, 0, 0, 1, tzinfo=datetime.timezone.utc))
    write(os.path.join(logs, "app.log"), times, 0)
    watch = tron.SuccessWatch(services, topic, topic)
    hour = h.strftime("dt=%Y-%m-%d/hr=%H")
    tron.wait_until("_SUCCESS of the real hour", lambda: hour in watch.look(), timeout=180, interval=0.3,
                    on_timeout=sink.tail)
    names = [o["name"] for o in services.gcs_list(topic)]
    quarantined = sorted({n.split("/reason=")[1].split("/")[0] for n in names if "/reason=" in n})
    print("odd times: _SUCCESS %s; quarantine reasons %s; hours %s"
          % (watch.seen[hour], quarantined, sorted({n.split("/")[2] for n in names if "/dt=" in n})))
    assert watch.seen[hour][0] == 1000, watch.seen
    assert not any("dt=2100" in n or "dt=1970" in n for n in names), names
    assert quarantined == ["too_new", "too_old"], names
    assert agent.stop() == 0


def test_one_of_three_agents_cut_off_is_retired_after_host_timeout_and_its_late_rows_revise_the_hour(
        services, certs, workroot, procs):
    """Hosts a, b and c report; c's link to the relay is cut while c still writes lines of the
    hour. While a and b keep reporting, c holds the hour for `host_timeout` and is then retired:
    `_SUCCESS` comes with what arrived, the manifest names c as stale; once c is back its rows
    revise the manifest and count as late."""
    topic = "cut-off"
    work, logs, relay, sink, agent_a = pipeline(services, certs, workroot, procs, topic, "%ds" % HOST_TIMEOUT_S)
    agent_a.stop()  # the pipeline's own agent is replaced by three
    gate = tron.Gate(int(relay.config["listen"].rsplit(":", 1)[1])).open()
    agents = {}
    for name in ("a", "b", "c"):
        host_logs = os.path.join(work, "logs-" + name)
        os.makedirs(host_logs)
        address = "127.0.0.1:%d" % gate.port if name == "c" else relay.config["listen"]
        cfg = tron.agent_config(work, os.path.join(host_logs, "*.log"), "file://" + os.path.join(work, "s3-" + name),
                                address, certs, host=topic + "-" + name, state_dir=os.path.join(work, "state-" + name))
        del cfg["files"]
        for dest in cfg["destinations"].values():
            del dest["batch"]
        agents[name] = (tron.Proc("agent-" + name, "tron-agent", cfg, work), os.path.join(host_logs, "app.log"))
        procs.append(agents[name][0])
        agents[name][0].start()
    h = hour_start(2)
    for i, name in enumerate(("a", "b", "c")):
        write(agents[name][1], [h + datetime.timedelta(seconds=2 * k) for k in range(1000)], i * 100_000)
    # c keeps writing lines of that hour (a replay), so its watermark stays inside it.
    keep = {"on": True}

    def c_writes():
        k = 1000
        while keep["on"]:
            write(agents["c"][1], [h + datetime.timedelta(seconds=2000 + k % 1500)], 200_000 + k)
            k += 1
            time.sleep(0.5)
        return k
    import threading
    result = {}
    writer = threading.Thread(target=lambda: result.setdefault("k", c_writes()), daemon=True)
    writer.start()
    try:
        tron.wait_until("c holding the hour", lambda: topic + "-c" in hours_command(sink, topic)[1], timeout=90,
                        interval=1, on_timeout=lambda: hours_command(sink, topic)[1])
        gate.close()
        cut = time.time()
        watch = tron.SuccessWatch(services, topic, topic)
        hour = h.strftime("dt=%Y-%m-%d/hr=%H")
        tron.wait_until("_SUCCESS once c is retired", lambda: hour in watch.look(), timeout=HOST_TIMEOUT_S + 120,
                        interval=0.3, on_timeout=sink.tail)
        after_s = time.time() - cut
        rows, revision, completeness = watch.seen[hour]
        print("c cut off: _SUCCESS %.0f s later (host_timeout %d s): %d rows, revision %d, %s"
              % (after_s, HOST_TIMEOUT_S, rows, revision, completeness))
        assert after_s >= HOST_TIMEOUT_S - 2, "the hour did not wait for c"
        assert completeness["rule"] == "watermarks", completeness
        assert topic + "-c" in completeness["hosts_stale"], completeness
        assert {topic + "-a", topic + "-b"} <= set(completeness["hosts_complete"]), completeness
        assert rows >= 3000 and revision == 1, watch.seen[hour]
    finally:
        keep["on"] = False
        writer.join(10)
        gate.open()
    # c back: its rows land, the manifest is revised, counted as late.
    total = 3000 + (result["k"] - 1000)
    prefix = "%s/%s/" % (topic, h.strftime("dt=%Y-%m-%d/hr=%H"))

    def revised():
        m = json.loads(services.gcs_get(topic, "w/" + prefix + "_manifest.json"))
        return m if m["rows"] == total else None
    m = tron.wait_until("the manifest revised with c's rows", revised, timeout=180, interval=1,
                        on_timeout=lambda: services.gcs_get(topic, "w/" + prefix + "_manifest.json")[:400])
    late = sink.metric("tron_sink_late_objects_total", topic=topic)
    print("after c is back: revision %d, %d rows of %d, %s; late objects %s"
          % (m["revision"], m["rows"], total, m["completeness"], late))
    assert m["revision"] >= 2 and late >= 1
    for agent, _ in agents.values():
        assert agent.stop() == 0


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_an_agent_that_stops_cleanly_reports_drained_and_its_hour_does_not_wait_for_it(how, services, certs,
                                                                                         workroot, procs):
    """The only agent of a topic tails a file still being written with lines of an hour two
    hours ago, so its watermark stays inside that hour. Stopped cleanly (SIGTERM) with every line
    read and delivered, its last report says so ("drained", with the watermark still at the last
    line: its writer may go on while it restarts): once it has been silent for `host_timeout`
    the hour is finalized with all its rows and the host under `hosts_drained`, and the sink
    does not call it an outage. Killed (SIGKILL), it says nothing: the hour waits for it (a
    silence is not a departure), which is what a fully drained fleet did before, for 24 hours."""
    topic = "drained-" + how
    work, logs, relay, sink, agent = pipeline(services, certs, workroot, procs, topic, "%ds" % HOST_TIMEOUT_S)
    h = hour_start(2)
    path = os.path.join(logs, "app.log")
    write(path, [h + datetime.timedelta(seconds=2 * k) for k in range(1000)], 0)
    host = topic + "-host"
    written = 1000
    # The file is still being written: the watermark stays at its last line, inside the hour.
    deadline = time.time() + 90
    while host not in hours_command(sink, topic)[1]:
        assert time.time() < deadline, hours_command(sink, topic)[1]
        write(path, [h + datetime.timedelta(seconds=2000 + written % 1500)], written)
        written += 1
        time.sleep(0.3)
    for _ in range(10):
        write(path, [h + datetime.timedelta(seconds=2000 + written % 1500)], written)
        written += 1
        time.sleep(0.3)
    tron.wait_until("every line delivered", lambda: (agent.metric("tron_agent_records_sent_total",
                                                                  destination="relay") or 0) >= written,
                    timeout=60, interval=0.2, on_timeout=agent.tail)
    hour = h.strftime("dt=%Y-%m-%d/hr=%H")
    watch = tron.SuccessWatch(services, topic, topic)
    assert hour not in watch.look(), "the hour waited for the file being written"
    if how == "sigterm":
        assert agent.stop() == 0
    else:
        agent.kill()
    stopped = time.time()
    started = time.time()
    while time.time() - started < HOST_TIMEOUT_S + 20:
        watch.look()
        time.sleep(0.5)
    silent = tron.metric(sink.metrics(), "tron_sink_all_hosts_silent", topic=topic)
    code, hours = hours_command(sink, topic)
    print("%s: %d lines; _SUCCESS %s; all hosts silent %s %.0f s after the stop; hours:\n%s"
          % (how, written, watch.seen, silent, time.time() - stopped, hours))
    if how == "sigkill":
        assert hour not in watch.seen, "an hour finalized without the killed agent's word: %s" % watch.seen
        assert silent == 1 and host in hours, hours
        return
    assert hour in watch.seen, "the drained agent's hour still waits:\n%s" % sink.tail()
    rows, revision, completeness = watch.seen[hour]
    assert (rows, revision) == (written, 1), watch.seen[hour]
    assert completeness["rule"] == "watermarks" and completeness.get("hosts_drained") == [host], completeness
    assert silent == 0, "a drained fleet is not an outage"
    assert code == 0 and host not in hours, "the drained host holds nothing:\n" + hours
    marks = [json.loads(services.gcs_get(topic, "w/_tron/state/%s/%d.json" % (topic, p)))["hosts"].get(host, {})
             for p in range(3)]
    assert all(m.get("drained") for m in marks), marks


def test_rows_of_an_hour_four_days_old_are_counted_and_revise_its_manifest(services, certs, workroot, procs):
    """An agent back after four days: its lines (Kafka-stamped now, so not quarantined) land in
    their hour, the hour is finalized, and lines of it that come later still revise its manifest
    and count as late. The partition's hour counts used to be pruned 72 hours behind its newest
    event time, in the same write that counted them: such an hour was never finalized at all."""
    topic = "days-late"
    work, logs, relay, sink, agent = pipeline(services, certs, workroot, procs, topic, "%ds" % HOST_TIMEOUT_S)
    old = hour_start(96)
    recent = hour_start(2)
    path = os.path.join(logs, "app.log")
    write(path, [old + datetime.timedelta(seconds=3 * k) for k in range(300)], 0)
    write(path, [recent + datetime.timedelta(seconds=3 * k) for k in range(300)], 1000)
    watch = tron.SuccessWatch(services, topic, topic)
    old_hour = old.strftime("dt=%Y-%m-%d/hr=%H")
    tron.wait_until("_SUCCESS of the four-day-old hour", lambda: old_hour in watch.look(), timeout=180,
                    interval=0.5, on_timeout=lambda: hours_command(sink, topic)[1] + sink.tail())
    first = watch.seen[old_hour]
    write(path, [old + datetime.timedelta(seconds=1000 + k) for k in range(100)], 2000)
    prefix = "w/%s/%s/" % (topic, old_hour)

    def revised():
        m = json.loads(services.gcs_get(topic, prefix + "_manifest.json"))
        return m if m["rows"] == 400 else None
    m = tron.wait_until("the old hour's manifest revised", revised, timeout=180, interval=1,
                        on_timeout=lambda: services.gcs_get(topic, prefix + "_manifest.json")[:400])
    late = sink.metric("tron_sink_late_objects_total", topic=topic)
    print("four days late: first _SUCCESS %s; then revision %d with %d rows; late objects %s"
          % (first, m["revision"], m["rows"], late))
    assert first[0] == 300 and first[1] == 1, first
    assert m["revision"] >= 2 and late >= 1
    assert agent.stop() == 0
