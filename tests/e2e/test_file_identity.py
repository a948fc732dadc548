"""Files that begin alike are never one file (issue 23), through the whole pipeline: agent -> S3
and agent -> relay -> Kafka -> sink -> GCS, judged by every line in GCS (exactly once) and in S3
(at least once) and by each hour's manifest at the moment its `_SUCCESS` first appears.

Every scenario is an agent of its own (its own host name, log directory and state) at the
shipped defaults for files and batches, all running at once against one relay, topic and sink.
Every file a scenario writes begins with the same header line, as CSV, W3C and banner-led logs
do. The scenarios: rename rotation every 2 s at 2,000 lines/s; two such files side by side; 50
files of one host; the real logrotate with create, copytruncate, dateext, olddir, compress and
compress + delaycompress; truncate in place and rewrite; delete and recreate; and the agent
stopped across create, copytruncate, olddir and `mv app.log app.log.1 && gzip app.log.1`."""
import datetime
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter

import tron

HEADER = "time,level,host,message\n"  # the same first line in every file of every scenario
NOW = datetime.datetime.now(datetime.timezone.utc)
# Data lines span two hours that are over (3 h to 1 h ago), so their hours are finalized while
# the test watches.
START = NOW - datetime.timedelta(hours=3)
SPAN_S = 2 * 3600


class Scenario:
    """One agent and the lines its script writes: `seq` 0..n-1, event times across START + SPAN."""

    def __init__(self, name, lines, work, relay_address, services, certs, bucket, olddir=False):
        self.name, self.lines = name, lines
        self.dir = os.path.join(work, name)
        self.logs = os.path.join(self.dir, "logs")
        os.makedirs(self.logs)
        self.next_seq = 0
        # Lines from this seq on are written after a pause longer than the agent's writing window
        # (30 s), after which its watermark may pass every hour so far: they go to hours of their
        # own, as lines written later than those hours' end would in production be late.
        self.late_from = None
        cfg = tron.agent_config(self.dir, os.path.join(self.logs, "*.log"), "s3://%s/a" % bucket, relay_address,
                                certs, s3_endpoint=services.s3_endpoint, host=name)
        del cfg["files"]  # the shipped defaults
        for dest in cfg["destinations"].values():
            del dest["batch"]
        if olddir:
            self.old = os.path.join(self.dir, "old")
            os.makedirs(self.old)
            cfg["sources"][0]["olddir"] = self.old
        self.agent = tron.Proc("agent-" + name, "tron-agent", cfg, self.dir, env=dict(tron.servers.S3_CREDENTIALS))

    def path(self, name="app.log"):
        return os.path.join(self.logs, name)

    def write(self, n, name="app.log"):
        """Appends the next `n` lines (the header first if the file is new or empty)."""
        path = self.path(name)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a") as f:
            if new:
                f.write(HEADER)
            for _ in range(n):
                seq = self.next_seq
                self.next_seq += 1
                t = self.time_of(seq)
                f.write(json.dumps({"time": t.isoformat().replace("+00:00", "Z"), "seq": seq,
                                    "msg": "%s line %d" % (self.name, seq)}) + "\n")

    def write_at_rate(self, n, per_second, name="app.log"):
        step = max(1, per_second // 20)
        while n > 0:
            k = min(step, n)
            self.write(k, name)
            n -= k
            time.sleep(k / per_second)

    def time_of(self, seq):
        if self.late_from is not None and seq >= self.late_from:
            late_start = (NOW - datetime.timedelta(hours=6)).replace(minute=1, second=0, microsecond=0)
            return late_start + datetime.timedelta(seconds=3000 * (seq - self.late_from) / (self.lines - self.late_from))
        return START + datetime.timedelta(seconds=SPAN_S * seq / self.lines)

    def hours(self):
        return Counter(self.time_of(seq).strftime("dt=%Y-%m-%d/hr=%H") for seq in range(self.lines))

    def shipped_everything(self):
        m = self.agent.metrics()
        lags = [tron.metric(m, "tron_agent_destination_lag_bytes", destination=d) for d in ("s3", "relay")]
        return all(lag == 0 for lag in lags)

    def restart(self, while_stopped):
        assert self.agent.stop() == 0, self.agent.tail()
        while_stopped()
        self.agent.start()


def logrotate(s, directives):
    conf = os.path.join(s.dir, "logrotate.conf")
    with open(conf, "w") as f:
        f.write("%s {\n  rotate 20\n  missingok\n  notifempty\n  %s\n}\n" % (s.path(), "\n  ".join(directives)))
    subprocess.run(["logrotate", "-f", "-s", os.path.join(s.dir, "logrotate.state"), conf], check=True,
                   capture_output=True)


# Scripts: each writes exactly `lines` lines and returns.

def rename_every_2s(s, files=1, per_second=2000):
    names = ["app.log"] if files == 1 else ["app-%d.log" % i for i in range(files)]
    per_file = s.lines // files
    rotations = 0
    while s.next_seq < s.lines:
        for name in names:  # 2 s worth, spread over the files
            s.write_at_rate(min(per_second * 2 // files, s.lines - s.next_seq), per_second // files, name)
        rotations += 1
        for name in names:
            if os.path.exists(s.path(name)):
                os.rename(s.path(name), s.path(name) + ".%d" % rotations)
    assert per_file > 0


def many_files(s, files=50):
    for i in range(files):
        s.write(s.lines // files, "f%02d.log" % i)
        time.sleep(0.05)


def logrotate_mode(directives):
    def script(s):
        third = s.lines // 3
        s.write_at_rate(third, 2000)
        logrotate(s, directives)
        s.write_at_rate(third, 2000)
        time.sleep(1.5)
        logrotate(s, directives)
        s.write_at_rate(s.lines - 2 * third, 2000)
    return script


def truncate_and_rewrite(s):
    s.write(s.lines // 2)
    # Both destinations confirmed the header and every line (the archive's batch closes at the
    # shipped max_age, 60 s), and the checkpoints moved over them: lag sampled after that.
    def delivered():
        m = s.agent.metrics()
        return all((tron.metric(m, "tron_agent_records_sent_total", destination=d) or 0) >= s.next_seq + 1
                   for d in ("s3", "relay"))
    tron.wait_until(s.name + " delivering its file before the truncate", delivered, timeout=120, interval=1,
                    on_timeout=s.agent.tail)
    time.sleep(2.5)
    tron.wait_until(s.name + " checkpoints over the whole file", s.shipped_everything, timeout=30, interval=1,
                    on_timeout=s.agent.tail)
    with open(s.path(), "r+") as f:
        f.truncate(0)
    s.write(s.lines - s.next_seq)


def delete_and_recreate(s):
    s.write(s.lines // 2)
    time.sleep(2)
    os.remove(s.path())
    s.write(s.lines - s.next_seq)


def stopped_across(rotate):
    """The agent reads the first half, is stopped, 50 lines are appended and the file rotated;
    the agent is started again and the rest is written."""
    def script(s):
        s.write(s.lines // 2)
        time.sleep(3)

        def while_stopped():
            s.write(50)
            rotate(s)
        s.restart(while_stopped)
        s.write(s.lines - s.next_seq)
    return script


def mv_and_gzip(s):
    os.rename(s.path(), s.path("app.log.1"))
    subprocess.run(["gzip", s.path("app.log.1")], check=True)


def mv_and_create(s):
    os.rename(s.path(), s.path("app.log.1"))
    s.write(10)


def copy_and_truncate(s):
    shutil.copyfile(s.path(), s.path("app.log.1"))
    with open(s.path(), "r+") as f:
        f.truncate(0)
    s.write(10)


def mv_to_olddir(s):
    os.rename(s.path(), os.path.join(s.old, "app.log.1"))


SCENARIOS = [
    # name, lines, script, olddir
    ("rename-2s", 20_000, rename_every_2s, False),
    ("two-files", 40_000, lambda s: rename_every_2s(s, files=2, per_second=4000), False),
    ("fifty-files", 20_000, many_files, False),
    ("lr-create", 3_000, logrotate_mode(["create"]), False),
    ("lr-copytruncate", 3_000, logrotate_mode(["copytruncate"]), False),
    ("lr-dateext", 3_000, logrotate_mode(["create", "dateext", "dateformat -%Y%m%d-%s"]), False),
    ("lr-olddir", 3_000, None, True),  # script set below: needs the scenario's own olddir
    ("lr-compress", 3_000, logrotate_mode(["create", "compress"]), False),
    ("lr-delaycompress", 3_000, logrotate_mode(["create", "compress", "delaycompress"]), False),
    ("truncate-rewrite", 2_000, truncate_and_rewrite, False),
    ("delete-recreate", 2_000, delete_and_recreate, False),
    ("stopped-gzip", 2_000, stopped_across(mv_and_gzip), False),
    ("stopped-create", 2_000, stopped_across(mv_and_create), False),
    ("stopped-copytruncate", 2_000, stopped_across(copy_and_truncate), False),
    ("stopped-olddir", 2_000, stopped_across(mv_to_olddir), True),
]


def test_files_that_begin_alike_lose_no_line_under_every_rotation(services, certs, workroot, procs):
    work = os.path.join(workroot, "file-identity")
    os.makedirs(work)
    topic = bucket = "file-identity"
    services.create_topic(topic, 3)
    services.create_gcs_bucket(bucket)
    services.create_s3_bucket(bucket)
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, services.kafka_brokers, topic=topic), work)
    sink_cfg = tron.sink_config(work, services.kafka_brokers, "gs://%s/w" % bucket, gcs_endpoint=services.gcs_endpoint,
                                topic=topic, group=topic)
    sink_cfg["output"]["columns"] = [
        {"name": "time", "source": "@time", "type": "TIMESTAMP"},
        {"name": "host", "source": "host", "type": "STRING"},
        {"name": "id", "source": "_id", "type": "STRING"},
        {"name": "seq", "source": "seq", "type": "INTEGER"},
    ]
    sink_cfg["finalize"] = {"lateness": "1m", "interval": "1s"}
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
    procs.extend([relay, sink])
    relay.start(), sink.start()

    scenarios = []
    only = os.environ.get("TRON_IDENTITY_ONLY")  # e.g. "truncate-rewrite,lr-create" while debugging one
    for name, lines, script, olddir in SCENARIOS:
        if only and name not in only.split(","):
            continue
        s = Scenario(name, lines, work, relay.config["listen"], services, certs, bucket, olddir=olddir)
        if name == "lr-olddir":
            script = logrotate_mode(["create", "olddir %s" % s.old])
        if name == "truncate-rewrite":
            s.late_from = lines // 2
        scenarios.append((s, script))
        procs.append(s.agent)
        s.agent.start()

    errors = []

    def run(s, script):
        try:
            script(s)
            assert s.next_seq == s.lines, (s.name, s.next_seq)
        except Exception as e:  # reported below with the scenario's name
            errors.append("%s: %r" % (s.name, e))
    threads = [threading.Thread(target=run, args=sc) for sc in scenarios]
    started = time.time()
    for t in threads:
        t.start()
    expected = Counter()
    for s, _ in scenarios:
        expected += s.hours()
    watch = tron.SuccessWatch(services, bucket, topic)
    seen = watch.seen

    def look():
        watch.look()
        return all(h in seen for h in expected)
    while any(t.is_alive() for t in threads):
        look()
        time.sleep(0.3)
    assert not errors, errors
    print("scripts done in %.0fs" % (time.time() - started))
    tron.wait_until("_SUCCESS for every hour written", look, timeout=300, interval=0.3,
                    on_timeout=lambda: "seen %s\n%s" % (seen, sink.tail()))

    rows = tron.gcs_csv_rows(services, bucket, "w/%s/" % topic)
    data = Counter((r[1], int(r[3])) for r in rows if r[3])
    headers = Counter(r[1] for r in rows if not r[3])
    ids = Counter(r[2] for r in rows)
    want = {(s.name, seq) for s, _ in scenarios for seq in range(s.lines)}
    # S3 objects close at the shipped max_age (60 s): wait for the archive too.
    archive = {}

    def archived():
        archive.clear()
        for _, text in tron.s3_lines_by_object(services, bucket):
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if "seq" in line:
                archive[(line["host"], line["seq"])] = True
        return want <= set(archive)
    try:
        tron.wait_until("every line in the S3 archive", archived, timeout=150, interval=3)
    except AssertionError:
        pass  # judged below, by scenario
    report = []
    failed = []
    for s, _ in scenarios:
        mine = {(s.name, seq) for seq in range(s.lines)}
        missing_gcs = len(mine - set(data))
        doubled_gcs = sum(1 for k in mine if data.get(k, 0) > 1)
        missing_s3 = len(mine - set(archive))
        lost = s.agent.metric("tron_agent_lost_bytes_total") or 0
        report.append("%-22s lines %6d  GCS missing %d doubled %d  S3 missing %d  header rows %d  lost_bytes %d"
                      % (s.name, s.lines, missing_gcs, doubled_gcs, missing_s3, headers[s.name], lost))
        if missing_gcs or doubled_gcs or missing_s3 or lost:  # nothing here is physically lost
            failed.append(s.name)
    print("\n".join(report))
    for s, _ in scenarios:
        missing = sorted(seq for seq in range(s.lines) if (s.name, seq) not in data)
        if missing:
            print("%s: missing in GCS %s..%s; sink: %s" % (s.name, missing[0], missing[-1], sink.metrics()))
    for hour, (n, revision, completeness) in sorted(seen.items()):
        print("%s: _SUCCESS with %d rows (written %d), revision %d, rule %s" % (hour, n, expected[hour], revision,
                                                                               completeness["rule"]))
    assert not failed, "\n".join(report)
    assert all(n == 1 for n in ids.values()), "an _id in GCS twice: %s" % [i for i, n in ids.items() if n > 1][:5]
    wrong = {h: (v[0], expected[h]) for h, v in seen.items() if h in expected and v[0] != expected[h]}
    assert not wrong, "manifests at first sight (rows, written): %s" % wrong
    assert all(seen[h][1] == 1 for h in expected), seen
    for s, _ in scenarios:
        assert s.agent.stop() == 0, s.agent.tail()


def test_an_agent_upgraded_in_place_takes_over_the_checkpoints_of_the_old_identity(services, certs, workroot, procs):
    """An agent before the file table keyed its checkpoints by the hash of a file's first line
    (xxh3-64 of it, as `{:016x}`). The new binary on that state directory neither re-ships what
    the checkpoint covers nor skips what follows it, and the file keeps that hash as its id."""
    import xxhash
    work = os.path.join(workroot, "upgrade")
    logs = os.path.join(work, "logs")
    state = os.path.join(work, "agent-state")
    os.makedirs(logs), os.makedirs(os.path.join(state, "checkpoints"))
    bucket = "upgrade"
    services.create_s3_bucket(bucket)
    offsets = {}
    for name in ("a.log", "b.log"):  # the same first line: the old agent followed one of them
        with open(os.path.join(logs, name), "w") as f:
            f.write(HEADER)
            for seq in range(1000):
                if seq == 500:
                    offsets[name] = f.tell()
                f.write(json.dumps({"seq": seq, "msg": "%s %d" % (name, seq)}) + "\n")
    fp = xxhash.xxh3_64_intdigest(HEADER.encode()) or 1
    b_log = os.path.join(logs, "b.log")
    with open(os.path.join(state, "checkpoints", "s3.json"), "w") as f:
        json.dump({"version": 1, "files": {"%016x" % fp: {"offset": offsets["b.log"], "path": b_log}}}, f)
    with open(os.path.join(state, "started"), "w") as f:
        f.write("first scan done\n")
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "s3://%s/a" % bucket, None, certs,
                            s3_endpoint=services.s3_endpoint)
    del cfg["files"]
    del cfg["destinations"]["s3"]["batch"]
    agent = tron.Proc("agent", "tron-agent", cfg, work, env=dict(tron.servers.S3_CREDENTIALS))
    procs.append(agent)
    agent.start()
    tron.wait_until("both files read", lambda: (agent.metric("tron_agent_lines_read_total") or 0) >= 1001 + 500,
                    timeout=60, interval=0.5, on_timeout=agent.tail)
    assert agent.stop() == 0  # drains: the open archive batches are sent
    shipped = Counter()
    keys = set()
    for key, text in tron.s3_lines_by_object(services, bucket):
        line = json.loads(text)
        keys.add(key.rsplit("/", 1)[1])
        if "seq" in line:
            shipped[(os.path.basename(line["file"]), line["seq"])] += 1
    a = sorted(seq for (name, seq) in shipped if name == "a.log")
    b = sorted(seq for (name, seq) in shipped if name == "b.log")
    print("upgrade: a.log shipped %d lines from %s, b.log %d lines from %s; objects %s"
          % (len(a), a[:1], len(b), b[:1], sorted(keys)))
    assert a == list(range(1000)), "a.log (no checkpoint of its own) is read whole"
    assert b == list(range(500, 1000)), "b.log resumes exactly at its old checkpoint"
    assert max(shipped.values()) == 1
    assert any(k.startswith("app-1-%016x-" % fp) for k in keys), "b.log keeps the old hash as its id: %s" % keys
    with open(os.path.join(state, "files.json")) as f:
        assert "%016x" % fp in json.load(f)["files"]
