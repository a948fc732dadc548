"""Runs the whole pipeline on this machine: no cloud account, no Docker. Local directories stand
in for S3 and GCS; a Tansu Kafka broker is started here (or use --brokers HOST:PORT with a topic
`logs` that exists). Writes sample logs spanning three hours, waits until the sink has finalized
them, and prints the hour partitions produced."""
import argparse
import datetime
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
sys.path.insert(0, os.path.join(ROOT, "tests", "services"))
import certs as certs_mod  # noqa: E402
import servers  # noqa: E402
import tron  # noqa: E402


def tree(root):
    out = []
    for dirpath, _, files in sorted(os.walk(root)):
        if "/.meta" in dirpath or "/_tron" in dirpath:
            continue
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            out.append("  %s  (%d bytes)" % (os.path.relpath(path, root), os.path.getsize(path)))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--brokers", help="use this Kafka broker instead of starting Tansu")
    ap.add_argument("--lines", type=int, default=30000)
    ap.add_argument("--workdir", default=os.path.join(ROOT, ".run", "local"))
    args = ap.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "logs"))
    svc = servers.Services(os.path.join(work, "services"))
    procs = []
    try:
        if args.brokers:
            brokers = args.brokers
        else:
            svc.start_kafka()
            svc.create_topic("logs", 3)
            brokers = svc.kafka_brokers
        print("kafka: %s" % brokers)
        certs = certs_mod.make(os.path.join(work, "certs"))
        s3_dir = os.path.join(work, "s3-archive")
        gcs_dir = os.path.join(work, "gcs-warehouse")
        relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, brokers), work)
        sink = tron.Proc("sink", "tron-sink-secor", tron.sink_config(work, brokers, "file://" + gcs_dir), work)
        agent = tron.Proc("agent", "tron-agent", tron.agent_config(
            work, os.path.join(work, "logs", "*.log"), "file://" + s3_dir, relay.config["listen"], certs), work)
        procs = [agent, relay, sink]
        for p in (relay, sink, agent):
            p.start()
            print("started %s (config %s, log %s)" % (p.name, p.config_path, p.log))

        now = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0)
        base = now - datetime.timedelta(hours=3)
        with open(os.path.join(work, "logs", "app.log"), "w") as f:
            for i in range(args.lines):
                t = base + datetime.timedelta(seconds=i * 3 * 3600 // args.lines)
                f.write(json.dumps({"time": t.isoformat().replace("+00:00", "Z"), "seq": i,
                                    "msg": "GET /item/%d 200" % i}) + "\n")
        print("wrote %d sample lines over three hours to %s" % (args.lines, os.path.join(work, "logs", "app.log")))

        hours = sorted({(base + datetime.timedelta(hours=h)).strftime("dt=%Y-%m-%d/hr=%H") for h in range(3)})

        def done():
            return all(os.path.exists(os.path.join(gcs_dir, "logs", h, "_SUCCESS")) for h in hours)

        tron.wait_until("the sink to finalize three hours", done, timeout=120, interval=1,
                        on_timeout=lambda: "\n".join(p.tail() for p in procs))
        for p in procs:
            code = p.stop()
            print("stopped %s (exit %s)" % (p.name, code))
        print("\nS3 archive (%s):\n%s" % (s3_dir, tree(s3_dir)))
        print("\nGCS warehouse (%s):\n%s" % (gcs_dir, tree(gcs_dir)))
        total = sum(json.load(open(os.path.join(gcs_dir, "logs", h, "_manifest.json")))["rows"] for h in hours)
        print("\n%d of %d lines in %d finalized hour partitions." % (total, args.lines, len(hours)))
        return 0 if total == args.lines else 1
    finally:
        for p in procs:
            p.kill()
        svc.stop()


if __name__ == "__main__":
    sys.exit(main())
