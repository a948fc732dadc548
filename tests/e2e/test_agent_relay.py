"""The agent's relay destination against real relays: failover across several addresses, mutual
TLS with the Forward shared-key handshake and a user, and a relay that cannot ack for a while
(its Kafka unreachable) so the agent's ack time-out fires and chunks are re-sent."""
import json
import os
import re
import threading
import time

import pytest

import tron
from test_outage import write_steadily


def test_agent_fails_over_between_relays_and_loses_nothing(services, certs, workroot, procs):
    work = os.path.join(workroot, "failover")
    relay_a, _sink, _, _ = tron.relay_to_gcs(services, certs, work, procs, "failover", "failover", 3,
                                             columns=[{"name": "seq", "source": "seq", "type": "INTEGER"}])
    relay_b = tron.Proc("relay-b", "tron-relay", tron.relay_config(work, certs, services.kafka_brokers,
                                                                    topic="failover"), work)
    procs.append(relay_b)
    relay_b.start()
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    dead = "127.0.0.1:%d" % tron.servers.free_port()  # nothing listens here
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3"), dead, certs)
    cfg["destinations"]["relay"]["addresses"] = [dead, relay_a.config["listen"], relay_b.config["listen"]]
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.append(agent)
    agent.start()

    def connected():
        return re.findall(r'connected to relay relay=(\S+)', agent.tail(1 << 20))

    total = 3000 * 14
    writer = threading.Thread(target=write_steadily, args=(os.path.join(logs, "a.log"), total))
    writer.start()
    tron.wait_until("the agent on relay A", lambda: relay_a.config["listen"] in connected(), timeout=20,
                    interval=0.2, on_timeout=agent.tail)
    time.sleep(2)
    relay_a.kill()
    tron.wait_until("the agent failing over to relay B", lambda: relay_b.config["listen"] in connected(),
                    timeout=20, interval=0.2, on_timeout=agent.tail)
    time.sleep(3)
    relay_a.start()
    relay_b.kill()
    tron.wait_until("the agent back on relay A", lambda: connected()[-1] == relay_a.config["listen"], timeout=30,
                    interval=0.2, on_timeout=agent.tail)
    writer.join()
    tron.wait_until("every line in GCS", lambda: len({int(r[0]) for r in tron.gcs_csv_rows(
        services, "failover", "w/failover/")}) >= total, timeout=120, interval=2, on_timeout=agent.tail)
    log = agent.tail(1 << 20)
    assert "cannot connect to relay relay=%s" % dead in log
    assert {int(r[0]) for r in tron.gcs_csv_rows(services, "failover", "w/failover/")} == set(range(total))
    print("failover: A → B → (dead skipped) → A, connections in order: %s; %d lines, none lost"
          % (connected(), total))
    assert agent.stop() == 0


def write_seqs(path, first, n):
    with open(path, "a") as f:
        f.writelines(json.dumps({"seq": seq, "msg": "r" * 80}) + "\n" for seq in range(first, first + n))


def gcs_seqs(services, bucket, topic):
    return {int(r[0]) for r in tron.gcs_csv_rows(services, bucket, "w/%s/" % topic)}


def test_agent_with_client_certificate_shared_key_and_user_is_acked_and_a_wrong_key_is_refused(
        services, certs, workroot, procs):
    work = os.path.join(workroot, "agent-mtls")
    security = {"shared_key": "k3y", "users": [{"username": "agent", "password": "pw"}]}
    # Mutual TLS: only clients with a certificate from our CA get in.
    tls = {"cert": certs["server_cert"], "key": certs["server_key"], "client_ca": certs["ca"]}
    relay, _sink, _, _ = tron.relay_to_gcs(services, certs, work, procs, "agent-mtls", "agent-mtls", 2,
                                           columns=[{"name": "seq", "source": "seq", "type": "INTEGER"}],
                                           security=security, tls=tls)

    def agent(name, shared_key):
        d = os.path.join(work, name)
        os.makedirs(os.path.join(d, "logs"))
        cfg = tron.agent_config(d, os.path.join(d, "logs", "*.log"), "file://" + os.path.join(d, "s3"),
                                relay.config["listen"], certs, shared_key=shared_key)
        cfg["destinations"]["relay"].update(client_cert=certs["client_cert"], client_key=certs["client_key"],
                                            username="agent", password="pw")
        p = tron.Proc(name, "tron-agent", cfg, d)
        procs.append(p)
        return p.start(), os.path.join(d, "logs", "app.log")

    good, good_log = agent("agent-good", "k3y")
    bad, bad_log = agent("agent-bad", "wrong")
    write_seqs(good_log, 0, 5000)
    write_seqs(bad_log, 100_000, 100)
    tron.wait_until("the good agent's lines in GCS", lambda: gcs_seqs(services, "agent-mtls", "agent-mtls") >=
                    set(range(5000)), timeout=60, interval=1, on_timeout=good.tail)
    tron.wait_until("the bad agent refused", lambda: "cannot connect to relay" in bad.tail(), timeout=20,
                    on_timeout=bad.tail)
    status, body = bad.health()
    assert status == 503 and "relay" in body["reasons"], body
    assert "shared_key mismatch" in relay.tail(1 << 20)
    time.sleep(2)
    assert gcs_seqs(services, "agent-mtls", "agent-mtls") == set(range(5000)), "nothing of the refused agent"
    assert good.stop() == 0 and bad.stop() == 0


def test_relay_that_cannot_ack_makes_the_agent_resend_after_its_ack_timeout_and_nothing_is_lost(
        services, certs, workroot, procs):
    work = os.path.join(workroot, "no-ack")
    os.makedirs(work)
    services.create_topic("no-ack", 2)
    services.create_gcs_bucket("no-ack")
    kafka_port = int(services.kafka_brokers.rsplit(":", 1)[1])
    gate = tron.Gate(kafka_port)  # the relay's only way to Kafka, closed until the agent has given up waiting
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, "127.0.0.1:%d" % gate.port,
                                                                topic="no-ack"), work)
    sink_cfg = tron.sink_config(work, services.kafka_brokers, "gs://no-ack/w", gcs_endpoint=services.gcs_endpoint,
                                topic="no-ack", group="no-ack")
    sink_cfg["output"]["columns"] = [{"name": "seq", "source": "seq", "type": "INTEGER"}]
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
    cfg = tron.agent_config(work, os.path.join(work, "logs", "*.log"), "file://" + os.path.join(work, "s3"),
                            relay.config["listen"], certs)
    cfg["destinations"]["relay"]["ack_timeout"] = "2s"
    os.makedirs(os.path.join(work, "logs"))
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.extend([relay, sink, agent])
    relay.start(), sink.start(), agent.start()
    write_seqs(os.path.join(work, "logs", "app.log"), 0, 3000)
    tron.wait_until("the agent's ack time-out", lambda: "no ack within 2s" in agent.tail(1 << 20), timeout=30,
                    interval=0.5, on_timeout=agent.tail)
    assert gcs_seqs(services, "no-ack", "no-ack") == set()
    gate.open()
    tron.wait_until("every line in GCS once Kafka is reachable", lambda: gcs_seqs(services, "no-ack", "no-ack") ==
                    set(range(3000)), timeout=120, interval=2, on_timeout=agent.tail)
    resends = agent.tail(1 << 20).count("no ack within 2s")
    print("relay without Kafka: 'no ack within 2s' logged %d times (retries are logged at attempts 1, 2, 4, …), "
          "chunks re-sent on the same connection; all 3000 lines in GCS after Kafka came back" % resends)
    assert agent.stop() == 0
    gate.close()


@pytest.mark.parametrize("binding", ["certificate", "username"])
def test_with_names_bound_a_client_reports_only_for_its_own_host(binding, services, certs, workroot, procs):
    """`tls.reports_only_for_certificate_names`: host-a's certificate names host-a;
    `security.reports_only_for_usernames`: the Forward user host-a. An agent calling itself host-a
    with that certificate (or user) is heard; one calling itself host-b with the same credentials
    has its reports refused (so it cannot hold back or release hours of a host it is not), while
    its lines still arrive."""
    topic = "report-" + binding
    work = os.path.join(workroot, topic)
    tls = {"cert": certs["server_cert"], "key": certs["server_key"]}
    options = {}
    if binding == "certificate":
        tls.update(client_ca=certs["ca"], reports_only_for_certificate_names=True)
    else:
        options["security"] = {"shared_key": "k3y", "reports_only_for_usernames": True,
                               "users": [{"username": "host-a", "password": "pa"}]}
    relay, _sink, _, _ = tron.relay_to_gcs(services, certs, work, procs, topic, topic, 2,
                                           columns=[{"name": "seq", "source": "seq", "type": "INTEGER"}], tls=tls,
                                           **options)

    def agent(host):
        d = os.path.join(work, host)
        os.makedirs(os.path.join(d, "logs"))
        cfg = tron.agent_config(d, os.path.join(d, "logs", "*.log"), "file://" + os.path.join(d, "s3"),
                                relay.config["listen"], certs, host=host,
                                **({"shared_key": "k3y"} if binding == "username" else {}))
        if binding == "certificate":
            cfg["destinations"]["relay"].update(client_cert=certs["host_a_cert"], client_key=certs["host_a_key"])
        else:
            cfg["destinations"]["relay"].update(username="host-a", password="pa")
        p = tron.Proc(host, "tron-agent", cfg, d)
        procs.append(p)
        return p.start(), os.path.join(d, "logs", "app.log")

    a, a_log = agent("host-a")
    b, b_log = agent("host-b")
    write_seqs(a_log, 0, 1000)
    write_seqs(b_log, 100_000, 1000)
    want = set(range(1000)) | set(range(100_000, 101_000))
    tron.wait_until("both agents' lines in GCS", lambda: gcs_seqs(services, topic, topic) >= want,
                    timeout=90, interval=1, on_timeout=lambda: relay.tail())
    tron.wait_until("host-b's reports refused", lambda: (relay.metric("tron_relay_watermark_reports_refused_total")
                                                         or 0) > 0, timeout=30, interval=1, on_timeout=relay.tail)
    hosts = set()
    for _, _, v in tron.watermark_messages(services.kafka_brokers, topic, limit=15):
        hosts |= set(v["tron_watermarks"])
    print("\n%s binding: hosts in the relay's watermark messages: %s; refused reports: %s" % (
        binding, sorted(hosts), relay.metric("tron_relay_watermark_reports_refused_total")))
    assert "host-a" in hosts and "host-b" not in hosts, hosts
    assert "which the client certificate or user name does not name" in relay.tail(1 << 20)
    assert a.stop() == 0 and b.stop() == 0
