"""Relay failover: the agent is given a dead address and two real relays (both writing to one
Kafka topic). While lines are written, the relay in use is killed, then the other one: the agent
moves to the next address each time, skipping the dead one with back-off, and every line reaches
GCS through the sink."""
import os
import re
import threading
import time

import tron
from test_crash import gcs_rows
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
    tron.wait_until("every line in GCS", lambda: len({int(r[0]) for r in gcs_rows(
        services, "failover", "w/failover/")}) >= total, timeout=120, interval=2, on_timeout=agent.tail)
    log = agent.tail(1 << 20)
    assert "cannot connect to relay relay=%s" % dead in log
    assert {int(r[0]) for r in gcs_rows(services, "failover", "w/failover/")} == set(range(total))
    print("failover: A → B → (dead skipped) → A, connections in order: %s; %d lines, none lost"
          % (connected(), total))
    assert agent.stop() == 0
