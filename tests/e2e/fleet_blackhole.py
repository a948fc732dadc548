"""Run by test_relay_fleet.py under `unshare -n`: a network namespace of its own, so `tc` can drop
every packet to and from one relay's port — no reset, no TCP acknowledgement, what a
relay VM that vanished or a black-holed route looks like — without touching the machine's network.

In the namespace: Tansu, two relays, two agents with `addresses = [r1, r2]` at the shipped
defaults, 200 lines/s each. r1's port is black-holed; the script measures how long until every
line written in the 5 s after that is in Kafka (through r2; some went to r1 first and are stuck),
then lifts the filter and checks that every line is in Kafka. Prints one JSON line: the figures."""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "services"))

import servers  # noqa: E402
import tron  # noqa: E402
from test_relay_fleet import fleet_agents, fleet_relays, kafka_seqs  # noqa: E402


def sh(*args):
    subprocess.run(args, check=True, stderr=subprocess.DEVNULL)


def black_hole(port):
    """Every packet to or from `port` on this namespace's loopback goes to an HTB class of 1 byte/s
    with a one-packet queue: dropped, never answered (no RST, no ACK). The plain drop action
    (`act_gact`) and the `prio` qdisc are not in every kernel; HTB and u32 are."""
    sh("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "2")
    sh("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "8bit", "ceil", "8bit",
       "burst", "1", "cburst", "1")
    sh("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:2", "htb", "rate", "10gbit")
    sh("tc", "qdisc", "add", "dev", "lo", "parent", "1:1", "handle", "10:", "pfifo", "limit", "1")
    for direction in ("dport", "sport"):
        sh("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
           "match", "ip", direction, port, "0xffff", "flowid", "1:1")


def main(work, certs):
    sh("ip", "link", "set", "lo", "up")
    services = servers.Services(os.path.join(work, "services"))
    procs = []
    try:
        services.start_kafka()
        services.create_topic("blackhole", 4)
        relays = fleet_relays(work, certs, services.kafka_brokers, "blackhole")
        agents, writers = fleet_agents(work, certs, relays, 2, "bh")
        procs = relays + agents
        for p in procs:
            p.start()
        for w in writers:
            w.start()
        tron.wait_until("both relays delivering", lambda: all(
            (r.metric("tron_relay_records_delivered_total") or 0) > 0 for r in relays), timeout=60)
        time.sleep(5)
        port = relays[0].config["listen"].rsplit(":", 1)[1]
        black_hole(port)
        t0 = time.time()
        # The lines of the first 5 s after it: the chunks that carry them went partly to r1 (it had
        # nothing waiting, so it still looked as good as r2) and are stuck there.
        time.sleep(6)
        after = [s for w in writers for s in w.seqs_between(t0, t0 + 5)]
        moved_after = None
        while time.time() - t0 < 150:
            seqs = kafka_seqs(services.kafka_brokers, "blackhole")
            if all(s in seqs for s in after):
                moved_after = time.time() - t0
                break
            time.sleep(1)
        before = after
        sh("tc", "qdisc", "del", "dev", "lo", "root")
        for w in writers:
            w.stop()
        expected = {s for w in writers for s in range(w.base, w.base + w.count())}
        deadline = time.time() + 120
        missing = len(expected)
        while time.time() < deadline:
            missing = len(expected - kafka_seqs(services.kafka_brokers, "blackhole"))
            if missing == 0:
                break
            time.sleep(2)
        # Given up by the agent's ack time-out, or by the kernel (TCP_USER_TIMEOUT), whichever first.
        timeouts = sum(a.metric("tron_agent_send_retries_total", destination="relay", reason=reason) or 0
                       for a in agents for reason in ("ack_timeout", "connection_lost"))
        result = {"lines_first_5s": len(before), "moved_after_s": round(moved_after, 1) if moved_after
                  else 999, "ack_timeouts": timeouts, "lines": len(expected), "missing_at_end": missing}
        print("r1 black-holed: every line written in the 5 s after was in Kafka %.1f s after it began (through r2); "
              "%d chunks given up on r1 and re-sent; %d lines, %d missing at the end" % (
                  result["moved_after_s"], timeouts, len(expected), missing))
        print(json.dumps(result))
    finally:
        for p in procs:
            p.kill()
        services.stop()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
