"""tron benchmarks against the real servers (Tansu, fake-gcs-server) on 127.0.0.1. Prints
throughput, latency percentiles and peak RSS (VmHWM) per component. Not timed assertions: figures.

    bash bench/run.sh                 # all, 1,000,000 records each
    bash bench/run.sh agent --records 200000
"""
import argparse
import datetime
import gzip
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
sys.path.insert(0, os.path.join(ROOT, "tests", "services"))
import certs as certs_mod  # noqa: E402
import msgpack  # noqa: E402
import servers  # noqa: E402
import tron  # noqa: E402
import zstandard  # noqa: E402


def metric(proc, name):
    return proc.metric(name) or 0.0


def histogram_percentiles(proc, name, qs=(0.5, 0.9, 0.99)):
    buckets = []
    for line in proc.metrics().splitlines():
        m = re.match(r'%s_bucket\{.*le="([^"]+)".*\} (\S+)' % name, line)
        if m:
            buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), float(m.group(2))))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    return {q: next(le for le, c in buckets if c >= q * total) for q in qs}


def record_line(i, now_iso):
    # 215 bytes with the newline: a typical access-log JSON line.
    base = '{"time":"%s","seq":%d,"method":"GET","path":"/api/v1/items/%08d","status":200,"bytes":5120,"ua":"bench"' % (now_iso, i, i)
    pad = 214 - len(base) - len(',"pad":""}')
    return base + ',"pad":"' + "x" * max(pad, 0) + '"}'


def wait_metric(proc, name, target, timeout, sampler=None, labels=None):
    start = time.time()
    while time.time() - start < timeout:
        if sampler:
            sampler()
        if (proc.metric(name, **(labels or {})) or 0.0) >= target:
            return time.time() - start
        time.sleep(0.2)
    raise RuntimeError("%s did not reach %d within %ds (at %d)" % (name, target, timeout, metric(proc, name)))


def bench_agent(svc, certs, work, n):
    """One file of n 215-byte JSON lines, tail → relay with acks (relay → Kafka)."""
    svc.create_topic("bench-agent", 3)
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, svc.kafka_brokers, topic="bench-agent"), work).start()
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    with open(os.path.join(logs, "big.log"), "w") as f:
        for i in range(n):
            f.write(record_line(i, now) + "\n")
    size = os.path.getsize(os.path.join(logs, "big.log"))
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3"),
                            relay.config["listen"], certs)
    del cfg["destinations"]["s3"]
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    start = time.time()
    agent.start()
    elapsed = wait_metric(relay, "tron_relay_records_delivered_total", n, 600)
    elapsed = time.time() - start
    wait_metric(agent, "tron_agent_records_sent_total", n, 60)
    print("agent → relay (acked, into Kafka): %d lines (%.1f MB) in %.1fs = %.0f lines/s, %.1f MB/s; "
          "agent peak RSS %.1f MiB, relay peak RSS %.1f MiB"
          % (n, size / 1e6, elapsed, n / elapsed, size / 1e6 / elapsed, agent.peak_rss_mib(), relay.peak_rss_mib()))
    agent.stop(), relay.stop()


class ForwardReceiver:
    """Fluent Bit 5.1.1 in_forward -> null, the receiver both senders of bench_senders talk to
    (plaintext or TLS, acks on); its HTTP metrics count what arrived."""

    def __init__(self, work, certs=None):
        self.port, self.http = servers.free_port(), servers.free_port()
        tls = ("    tls On\n    tls.verify Off\n    tls.crt_file %s\n    tls.key_file %s\n"
               % (certs["server_cert"], certs["server_key"])) if certs else ""
        conf = os.path.join(work, "receiver-%s.conf" % ("tls" if certs else "plain"))
        with open(conf, "w") as f:
            f.write("[SERVICE]\n    Flush 1\n    Log_Level warn\n    HTTP_Server On\n    HTTP_Listen 127.0.0.1\n"
                    "    HTTP_Port %d\n[INPUT]\n    Name forward\n    Listen 127.0.0.1\n    Port %d\n%s"
                    "[OUTPUT]\n    Name null\n    Match *\n" % (self.http, self.port, tls))
        self.proc = subprocess.Popen([FLUENT_BIT, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.wait_for("Fluent Bit receiver", lambda: self.records() is not None, timeout=20)

    def records(self):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/api/v1/metrics" % self.http, timeout=2) as r:
                return sum(v.get("records", 0) for v in json.load(r)["input"].values())
        except OSError:
            return None

    def wait_for(self, n, timeout=600):
        deadline = time.time() + timeout
        while (self.records() or 0) < n:
            if time.time() > deadline:
                raise RuntimeError("the receiver has %s of %d records" % (self.records(), n))
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def write_lines(path, n):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    with open(path, "w") as f:
        for i in range(n):
            f.write(record_line(i, now) + "\n")
    return os.path.getsize(path)


def start_fluent_bit_sender(work, log, receiver, tls_ca):
    """Fluent Bit tail (JSON parser; `log` may be a glob) -> forward with acks."""
    parsers = os.path.join(work, "parsers.conf")
    with open(parsers, "w") as f:
        f.write("[PARSER]\n    Name json\n    Format json\n    Time_Key time\n"
                "    Time_Format %Y-%m-%dT%H:%M:%S.%LZ\n    Time_Keep On\n")
    tls = "    tls On\n    tls.verify On\n    tls.ca_file %s\n    tls.vhost localhost\n" % tls_ca if tls_ca else ""
    conf = os.path.join(work, "sender.conf")
    with open(conf, "w") as f:
        f.write("[SERVICE]\n    Flush 1\n    Log_Level warn\n    Parsers_File %s\n"
                "[INPUT]\n    Name tail\n    Path %s\n    Read_from_Head On\n    Parser json\n"
                "    File_Cache_Advise Off\n    DB %s\n    Tag bench\n"
                "[OUTPUT]\n    Name forward\n    Match *\n    Host 127.0.0.1\n    Port %d\n"
                "    Require_ack_response On\n%s" % (parsers, log, os.path.join(work, "tail.db"), receiver.port, tls))
    return subprocess.Popen([FLUENT_BIT, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_fluent_bit_sender(work, log, receiver, tls_ca):
    """Fluent Bit on one file; returns (CPU-s, peak MiB, wall s) once the receiver has every line."""
    before = receiver.records() or 0
    start = time.time()
    sender = start_fluent_bit_sender(work, log, receiver, tls_ca)
    try:
        try:
            receiver.wait_for(before + count_lines(log), timeout=180)
        except RuntimeError as e:
            # Seen with TLS: Fluent Bit stalls on acks and retries; report what it did.
            print("senders: Fluent Bit did not finish: %s" % e)
        # The last ack reaches the sender after the receiver counted the records.
        time.sleep(1.5)
        return tron.cpu_seconds(sender.pid), tron.peak_rss_mib(sender.pid), time.time() - start
    finally:
        sender.terminate()
        sender.wait()


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def agent_sender(svc, certs, work, log, receiver=None, tls=False, compression="gzip", s3=False, s3_level=None):
    """tron-agent at its default settings tailing `log` (a glob) to the receiver and/or to S3 (moto)."""
    s3_url = "s3://bench-archive/%s" % os.path.basename(work) if s3 else None
    cfg = tron.agent_config(work, log, s3_url, "127.0.0.1:%d" % receiver.port if receiver else None, certs,
                            s3_endpoint=svc.s3_endpoint if s3 else None)
    cfg["files"] = {}  # defaults
    if not s3:
        del cfg["destinations"]["s3"]
    else:
        del cfg["destinations"]["s3"]["batch"]
        if s3_level is not None:
            cfg["destinations"]["s3"]["gzip_level"] = s3_level
    if receiver:
        relay = cfg["destinations"]["relay"]
        del relay["batch"]
        if compression != "gzip":  # the default; left out so an older build can run the same scenario
            relay["compression"] = compression
        if not tls:
            relay["plaintext"] = True
            del relay["tls_ca"], relay["tls_server_name"]
    return tron.Proc(os.path.basename(work), "tron-agent", cfg, work, env=servers.S3_CREDENTIALS if s3 else None)


def stop_with_rusage(proc):
    """SIGTERM (the agent drains: seals and sends what is open) and the figures of the whole life
    of the process: (exit code, CPU-s from wait4, peak RSS MiB from VmHWM sampled until the exit;
    wait4's ru_maxrss is no use here, it counts the forked Python before the exec)."""
    peak = proc.peak_rss_mib()
    proc.proc.send_signal(signal.SIGTERM)
    while True:
        pid, status, usage = os.wait4(proc.proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            peak = max(peak, proc.peak_rss_mib())
        except OSError:
            pass
        time.sleep(0.005)
    proc.proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.proc.returncode, usage.ru_utime + usage.ru_stime, peak


def run_agent_sender(svc, certs, work, log, n, receiver=None, tls=False, compression="gzip", s3=False):
    """The agent on one file; returns (CPU-s, peak MiB, wall s) once every line is acknowledged by
    each destination.

    With S3, the last object waits for `batch.max_age` (60 s) after the file is read; an idle agent
    polled for its metrics for a minute is not the cost of the lines. So once every line is read
    (and, with the relay, acknowledged) the agent is stopped: its drain uploads the open object,
    the figures are those of its whole life (wait4), and the archive is checked to hold every line."""
    agent = agent_sender(svc, certs, work, log, receiver, tls, compression, s3)
    destinations = len(agent.config["destinations"])
    start = time.time()
    agent.start()
    profile = start_profile(agent, os.path.basename(work))
    try:
        if not s3:
            wait_metric(agent, "tron_agent_records_sent_total", n * destinations, 600)
            stop_profile(profile)
            return agent.cpu_seconds(), agent.peak_rss_mib(), time.time() - start
        wait_metric(agent, "tron_agent_lines_read_total", n * destinations, 600)
        if receiver:
            wait_metric(agent, "tron_agent_records_sent_total", n, 600, sampler=None, labels={"destination": "relay"})
            print("senders: both destinations: %s" % shared_reads(agent), flush=True)
        code, cpu, hwm = stop_with_rusage(agent)
        stop_profile(profile)  # perf ends with the process: the drain's last upload is in the profile
        wall = time.time() - start
        prefix = os.path.basename(work) + "/"
        archived = sum(1 for _ in tron.s3_lines_by_object(svc, "bench-archive", prefix))
        if code != 0 or archived != n:
            raise RuntimeError("agent exit %s, %d of %d lines archived" % (code, archived, n))
        return cpu, hwm, wall
    finally:
        agent.stop()


def shared_reads(agent):
    """How many blocks one destination read and parsed for both (agent/src/shared_reads.rs), and
    why the others were read alone."""
    taken = agent.metric("tron_agent_shared_reads_total", result="taken") or 0
    alone = {r: agent.metric("tron_agent_shared_reads_total", result=r) or 0 for r in ("not_due", "cache_full")}
    return "%d blocks read once for both (read alone: %d, the other not due; %d, cache full)" % (
        taken, alone["not_due"], alone["cache_full"])


def start_profile(proc, name):
    """TRON_BENCH_PROFILE=DIR: `perf record` of a measured process while it works, for the profile
    that explains its CPU (`perf report -i DIR/NAME.perf`); its CPU figures then include perf's cost."""
    if not os.environ.get("TRON_BENCH_PROFILE"):
        return None
    out = os.path.join(os.environ["TRON_BENCH_PROFILE"], "%s.perf" % name)
    # Frame-pointer stacks stop at libc and librdkafka; TRON_BENCH_PROFILE_DWARF=1 unwinds them
    # (bigger files, more of perf's own cost).
    stacks = ["--call-graph", "dwarf,16384", "-F", "499"] if os.environ.get("TRON_BENCH_PROFILE_DWARF") else ["-g", "-F", "999"]
    return subprocess.Popen(["perf", "record"] + stacks + ["-o", out, "-p", str(proc.proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profile(profile):
    if profile:
        if profile.poll() is None:
            profile.send_signal(signal.SIGINT)
        profile.wait(60)


def gzip_cost(path, level):
    """CPU-s of `gzip -LEVEL` compressing a file to /dev/null: the yardstick measured in the same run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(path, "rb") as f:
        subprocess.run(["gzip", "-%d" % level, "-c"], stdin=f, stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_senders(svc, certs, work, n):
    """Agent scenarios, each against the same Fluent Bit receiver as Fluent Bit's own tail ->
    forward on the same file: CPU-seconds per million lines and peak RSS of the sender."""
    if not os.path.exists(FLUENT_BIT):
        print("senders: skipped (no Fluent Bit at %s: it is the receiver and the peer)" % FLUENT_BIT)
        return
    svc.create_s3_bucket("bench-archive")
    log = os.path.join(mk(work, "logs"), "big.log")
    size = write_lines(log, n)
    rows = []

    def row(name, result, note=""):
        cpu, hwm, wall = result
        rows.append((name, cpu, hwm, wall))
        print("senders: %-48s %6.2f CPU-s (%.2f per million lines), peak RSS %5.1f MiB, %5.1f s wall, %.0f MB/s%s"
              % (name, cpu, cpu * 1e6 / n, hwm, wall, size / 1e6 / wall, note), flush=True)

    def tron_row(name, run):
        """`run(k)` RUNS times; each run printed, the row is their median (see `--runs`)."""
        results = []
        for k in range(RUNS):
            results.append(run(k))
            if RUNS > 1:
                cpu, hwm, wall = results[-1]
                print("senders:   run %d of %d: %6.2f CPU-s, peak RSS %5.1f MiB, %5.1f s wall" % (k + 1, RUNS, cpu, hwm, wall),
                      flush=True)
        row(name, tuple(statistics.median(r[i] for r in results) for i in range(3)),
            " (median of %d runs)" % RUNS if RUNS > 1 else "")

    for tls in (False, True):
        receiver = ForwardReceiver(work, certs if tls else None)
        link = "TLS" if tls else "plaintext"
        try:
            row("Fluent Bit tail -> forward, %s, acks" % link,
                run_fluent_bit_sender(mk(work, "fb-%s" % link), log, receiver, certs["ca"] if tls else None))
            for compression in ("gzip", "zstd", "none"):
                tron_row("tron-agent -> forward, %s, acks, %s" % (link, compression),
                         lambda k: run_agent_sender(svc, certs, mk(work, "agent-%s-%s-%d" % (link, compression, k)), log,
                                                    n, receiver=receiver, tls=tls, compression=compression))
            if tls:
                tron_row("tron-agent -> S3 (moto) only",
                         lambda k: run_agent_sender(svc, certs, mk(work, "agent-s3-%d" % k), log, n, s3=True))
                tron_row("tron-agent -> forward (TLS, gzip) + S3", lambda k: run_agent_sender(
                    svc, certs, mk(work, "agent-both-%d" % k), log, n, receiver=receiver, tls=True, s3=True))
                tron_row("tron-agent -> forward (TLS, zstd) + S3", lambda k: run_agent_sender(
                    svc, certs, mk(work, "agent-both-zstd-%d" % k), log, n, receiver=receiver, tls=True, s3=True,
                    compression="zstd"))
        finally:
            receiver.stop()
    for level in (1, 6):
        cpu = statistics.median(gzip_cost(log, level) for _ in range(RUNS))
        rows.append(("gzip -%d of the same file" % level, cpu, float("nan"), float("nan")))
        print("senders: %-48s %6.2f CPU-s (%.2f per million lines)" % ("gzip -%d of the same file" % level, cpu, cpu * 1e6 / n),
              flush=True)
    by_name = {name: cpu for name, cpu, _, _ in rows}
    fwd, s3 = by_name["tron-agent -> forward, TLS, acks, gzip"], by_name["tron-agent -> S3 (moto) only"]
    both = by_name["tron-agent -> forward (TLS, gzip) + S3"]
    print("senders: both destinations / the more expensive one alone = %.2f (target <= 1.3)" % (both / max(fwd, s3)))
    zstd_fwd, zstd_both = by_name["tron-agent -> forward, TLS, acks, zstd"], by_name["tron-agent -> forward (TLS, zstd) + S3"]
    print("senders: with compression = \"zstd\" on the relay link: both / the more expensive alone = %.2f"
          % (zstd_both / max(zstd_fwd, s3)))
    for link in ("plaintext", "TLS"):
        none = by_name["tron-agent -> forward, %s, acks, none" % link]
        print("senders: compression none (%s) / gzip -1 of the same file = %.2f (target <= 1.0)"
              % (link, none / by_name["gzip -1 of the same file"]))
    return rows


def write_rotating(logs, files, per_file, rate, every):
    """Appends `per_file` lines to each of `files` files at `rate` lines/s in all, renaming every
    `f.log` to `f.log.<k>` (a new `f.log` follows) every `every` seconds; returns lines written."""
    handles = [open(os.path.join(logs, "f%03d.log" % i), "w") for i in range(files)]
    total, rotations, started = 0, 0, time.time()
    per_tick = max(1, rate // 10 // files)
    while total < files * per_file:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        for f in handles:
            f.writelines(record_line(total + i, now) + "\n" for i in range(per_tick))
            f.flush()
            total += per_tick
        if time.time() - started >= every * (rotations + 1):
            rotations += 1
            for i, f in enumerate(handles):
                f.close()
                path = os.path.join(logs, "f%03d.log" % i)
                os.rename(path, "%s.%d" % (path, rotations))
                handles[i] = open(path, "w")
        time.sleep(max(0.0, started + total / rate - time.time()))
    for f in handles:
        f.close()
    return total, rotations


def bench_rotation(svc, certs, work, files=100, per_file=10_000, rate=20_000, every=5.0):
    """`files` files × `per_file` lines written at `rate` lines/s in all, every file renamed away
    every `every` s; Fluent Bit tail -> forward and tron-agent -> forward (plaintext, acks, gzip)
    against the same receiver, each on its own copy of the workload. CPU-s is the sender's over
    the whole run (writing included, so both idle alike)."""
    if not os.path.exists(FLUENT_BIT):
        print("rotation: skipped (no Fluent Bit at %s: it is the receiver and the peer)" % FLUENT_BIT)
        return
    receiver = ForwardReceiver(work, None)
    try:
        senders = ("tron-agent",) if os.environ.get("BENCH_SKIP_PEER") else ("Fluent Bit", "tron-agent")
        for name in senders:
            logs = mk(work, "logs-" + name.replace(" ", "-"))
            glob_ = os.path.join(logs, "*.log")
            before = receiver.records() or 0
            start = time.time()
            if name == "Fluent Bit":
                proc = start_fluent_bit_sender(mk(work, "fb-rotation"), glob_, receiver, None)
                pid = proc.pid
            else:
                proc = agent_sender(svc, certs, mk(work, "agent-rotation"), glob_, receiver).start()
                pid = proc.proc.pid
            try:
                total, rotations = write_rotating(logs, files, per_file, rate, every)
                written = time.time() - start
                try:
                    receiver.wait_for(before + total, timeout=120)
                except RuntimeError as e:
                    print("rotation: %s did not deliver everything: %s" % (name, e))
                got = (receiver.records() or 0) - before
                time.sleep(1.5)
                cpu, hwm = tron.cpu_seconds(pid), tron.peak_rss_mib(pid)
            finally:
                proc.terminate() if name == "Fluent Bit" else proc.stop()
                if name == "Fluent Bit":
                    proc.wait()
            print("rotation: %-10s %d files x %d lines at %d lines/s, %d renames each: %d of %d delivered, "
                  "last %.1f s after the last write; %.2f CPU-s (%.2f per million lines), peak RSS %.1f MiB"
                  % (name, files, per_file, rate, rotations, got, total, time.time() - start - written - 1.5,
                     cpu, cpu * 1e6 / total, hwm), flush=True)
    finally:
        receiver.stop()


def chunk_frames(client, n, per_chunk, compression="gzip"):
    """Each client as tron-agent sends one file: every chunk says where its records came from
    (`tron_source`, `tron_positions`: forward/src/origin.rs), so the relay keys and partitions them
    by their source and the sink keeps each record's range for its duplicate filter, as for the
    fleet's records."""
    compress = {"gzip": lambda b: gzip.compress(b, 1), "zstd": lambda b: zstandard.ZstdCompressor(level=1).compress(b)}
    now = time.time()
    frames = []
    for c in range(0, n, per_chunk):
        entries = b"".join(msgpack.packb([msgpack.ExtType(0, int(now).to_bytes(4, "big") + b"\0\0\0\0"),
                                          json.loads(record_line(client * n + i, "2026-11-22T00:00:00Z"))])
                           for i in range(c, min(c + per_chunk, n)))
        size = min(per_chunk, n - c)
        # The first record's offset, then each line's length (215 bytes): LEB128 varints.
        positions = leb128(c * 215) + leb128(215) * size
        frames.append(("c%d-%d" % (client, c), msgpack.packb(
            ["bench", compress[compression](entries),
             {"chunk": "c%d-%d" % (client, c), "size": size, "compressed": compression,
              "tron_source": "bench-%d/%016x" % (client, client), "tron_positions": positions}])))
    return frames


def leb128(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def send_chunks(host, port, frames, window=16):
    s = socket.create_connection((host, port))
    unpacker = msgpack.Unpacker(raw=False)
    pending = 0
    i = 0
    while i < len(frames) or pending:
        while i < len(frames) and pending < window:
            s.sendall(frames[i][1])
            i += 1
            pending += 1
        unpacker.feed(s.recv(65536))
        for _ in unpacker:
            pending -= 1
    s.close()


def bench_relay(svc, certs, work, n, clients=4, compression="gzip", topic="bench-relay"):
    """n 215-byte records from `clients` concurrent Forward clients (1000-record chunks with acks,
    gzip level 1 or zstd level 1)."""
    svc.create_topic(topic, 3)
    cfg = tron.relay_config(work, certs, svc.kafka_brokers, topic=topic, plaintext=True)
    relay = tron.Proc("relay", "tron-relay", cfg, work).start()  # default limits
    host, port = relay.config["listen"].rsplit(":", 1)
    per = n // clients
    frames = [chunk_frames(c, per, 1000, compression) for c in range(clients)]
    start = time.time()
    threads = [threading.Thread(target=send_chunks, args=(host, int(port), f)) for f in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - start
    cpu = relay.cpu_seconds()
    print("relay: %d records from %d clients (%s chunks) into Kafka, acked, in %.1fs = %.0f records/s; relay %.2f CPU-s "
          "(%.2f per million records); peak RSS %.1f MiB (default limits)"
          % (per * clients, clients, compression, elapsed, per * clients / elapsed, cpu, cpu * 1e6 / (per * clients),
             relay.peak_rss_mib()))
    relay.stop()
    return per * clients


FLUENT_BIT = os.path.join(ROOT, "..", "shared", "peers", "fluent-bit", "fluent-bit")
RUNS = 1  # `--runs`


def bench_relay_peer(work, n, clients=4):
    """The same stream as bench_relay into Fluent Bit 5.1.1's in_forward -> null (the peer the
    relay's CPU is compared with); skipped with a message when ../shared is absent."""
    if not os.path.exists(FLUENT_BIT):
        print("relay peer: skipped (no Fluent Bit at %s)" % FLUENT_BIT)
        return
    peer = ForwardReceiver(work)
    port = peer.port
    try:
        per = n // clients
        frames = [chunk_frames(c, per, 1000) for c in range(clients)]
        start = time.time()
        threads = [threading.Thread(target=send_chunks, args=("127.0.0.1", port, f)) for f in frames]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - start
        cpu, hwm = tron.cpu_seconds(peer.proc.pid), tron.peak_rss_mib(peer.proc.pid)
        print("relay peer: Fluent Bit 5.1.1 in_forward -> null, same %d records from %d clients, acked, in %.1fs; "
              "%.2f CPU-s (%.2f per million records); peak RSS %.1f MiB"
              % (per * clients, clients, elapsed, cpu, cpu * 1e6 / (per * clients), hwm))
    finally:
        peer.stop()


def bench_relay_from_fluent_bit(svc, work, n):
    """The issue's scenario: Fluent Bit 5.1.1 tails n 215-byte JSON lines and forwards them (acks
    required) to the relay (plaintext, default limits) → Kafka. Prints both processes' CPU."""
    if not os.path.exists(FLUENT_BIT):
        print("relay from Fluent Bit: skipped (no Fluent Bit at %s)" % FLUENT_BIT)
        return
    svc.create_topic("bench-fb", 3)
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, None, svc.kafka_brokers, topic="bench-fb",
                                                               plaintext=True), work).start()
    host, port = relay.config["listen"].rsplit(":", 1)
    log = os.path.join(work, "big.log")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    with open(log, "w") as f:
        for i in range(n):
            f.write(record_line(i, now) + "\n")
    parsers = os.path.join(work, "parsers.conf")
    with open(parsers, "w") as f:
        f.write("[PARSER]\n    Name json\n    Format json\n    Time_Key time\n"
                "    Time_Format %Y-%m-%dT%H:%M:%S.%LZ\n    Time_Keep On\n")
    conf = os.path.join(work, "fluent-bit.conf")
    with open(conf, "w") as f:
        f.write("[SERVICE]\n    Flush 1\n    Log_Level warn\n    Parsers_File %s\n"
                "[INPUT]\n    Name tail\n    Path %s\n    Read_from_Head On\n    Parser json\n"
                "    File_Cache_Advise Off\n    Tag bench\n"
                "[OUTPUT]\n    Name forward\n    Match *\n    Host %s\n    Port %s\n    Require_ack_response On\n"
                % (parsers, log, host, port))
    start = time.time()
    sender = subprocess.Popen([FLUENT_BIT, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_metric(relay, "tron_relay_records_delivered_total", n, 600)
        elapsed = time.time() - start
        fb_cpu, fb_hwm = tron.cpu_seconds(sender.pid), tron.peak_rss_mib(sender.pid)
        cpu = relay.cpu_seconds()
        print("relay from Fluent Bit: %d lines tailed by Fluent Bit 5.1.1 -> relay (acked) -> Kafka in %.1fs; "
              "relay %.2f CPU-s (%.2f per million records), peak RSS %.1f MiB; Fluent Bit (tail + forward) "
              "%.2f CPU-s, peak RSS %.1f MiB" % (n, elapsed, cpu, cpu * 1e6 / n, relay.peak_rss_mib(), fb_cpu, fb_hwm))
    finally:
        sender.terminate()
        sender.wait()
        relay.stop()


def bench_senders_live(svc, certs, work, rate=50_000, seconds=20):
    """The agent tailing a file as it is written (rate lines/s), the case a fleet runs all day:
    one destination, the other, and both. With both, the destinations read in step and one read
    and parse of each line serves both (agent/src/shared_reads.rs); a backlog (`senders`) is read
    by each at its own pace instead."""
    if not os.path.exists(FLUENT_BIT):
        print("senders-live: skipped (no Fluent Bit at %s: it is the receiver)" % FLUENT_BIT)
        return
    svc.create_s3_bucket("bench-archive")
    receiver = ForwardReceiver(work, certs)
    n = rate * seconds
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    lines = [(record_line(i, now) + "\n").encode() for i in range(n)]
    results = {}
    try:
        scenarios = (("forward (TLS, gzip)", dict(receiver=receiver, tls=True)), ("S3", dict(s3=True)),
                     ("forward (TLS, gzip) + S3", dict(receiver=receiver, tls=True, s3=True)),
                     ("forward (TLS, zstd) + S3", dict(receiver=receiver, tls=True, s3=True, compression="zstd")))
        for k, (name, kw) in enumerate(scenario for scenario in scenarios for _ in range(RUNS)):
            run = mk(work, "live-%d" % k)
            log = os.path.join(mk(run, "logs"), "app.log")
            open(log, "wb").close()
            agent = agent_sender(svc, certs, run, log, **kw)
            destinations = len(agent.config["destinations"])
            agent.start()
            with open(log, "ab", buffering=0) as f:
                start = time.time()
                step = rate // 100
                for i in range(0, n, step):
                    f.write(b"".join(lines[i:i + step]))
                    pause = start + (i + step) / rate - time.time()
                    if pause > 0:
                        time.sleep(pause)
            wait_metric(agent, "tron_agent_lines_read_total", n * destinations, 600)
            if "receiver" in kw:
                wait_metric(agent, "tron_agent_records_sent_total", n, 600, labels={"destination": "relay"})
            shared = shared_reads(agent) + ", " if destinations > 1 else ""
            code, cpu, hwm = stop_with_rusage(agent)
            results.setdefault(name, []).append(cpu)
            print("senders-live: tron-agent -> %-26s %d lines at %d/s: %.2f CPU-s per million lines, peak RSS %.1f MiB, %sexit %d"
                  % (name, n, rate, cpu * 1e6 / n, hwm, shared, code), flush=True)
    finally:
        receiver.stop()
    results = {name: statistics.median(cpus) for name, cpus in results.items()}
    if RUNS > 1:
        print("senders-live: medians of %d runs, CPU-s per million lines: %s"
              % (RUNS, "; ".join("%s %.2f" % (name, cpu * 1e6 / n) for name, cpu in results.items())))
    both = results["forward (TLS, gzip) + S3"]
    print("senders-live: both destinations / the more expensive one alone = %.2f (target <= 1.3)"
          % (both / max(results["forward (TLS, gzip)"], results["S3"])))
    print("senders-live: with compression = \"zstd\" on the relay link: both / S3 alone = %.2f"
          % (results["forward (TLS, zstd) + S3"] / results["S3"]))


def write_realistic_lines(path, n, seed=5):
    """Access-log JSON lines that compress like real ones: fields drawn from realistic value sets
    and a random request id, not the padding of `record_line` (which gzip shrinks 26:1)."""
    import random
    rnd = random.Random(seed)
    paths = ["/api/v1/%s/%d" % (kind, rnd.randrange(100000)) for kind in ("items", "users", "orders") for _ in range(300)]
    agents = ["Mozilla/5.0 (X11; Linux x86_64; rv:%d.0) Gecko/20100101 Firefox/%d.0" % (v, v) for v in range(100, 130)] + \
             ["curl/8.%d.0" % v for v in range(10)] + ["okhttp/4.%d.1" % v for v in range(12)]
    start = datetime.datetime.now(datetime.timezone.utc)
    with open(path, "w") as f:
        for i in range(n):
            t = start + datetime.timedelta(microseconds=i * 50)
            f.write(json.dumps({
                "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "remote": "10.%d.%d.%d" % (rnd.randrange(4), rnd.randrange(256), rnd.randrange(256)),
                "method": rnd.choice(("GET", "GET", "GET", "POST", "PUT", "DELETE")), "path": rnd.choice(paths),
                "status": rnd.choice((200, 200, 200, 200, 201, 204, 304, 400, 404, 500)), "bytes": rnd.randrange(0, 200000),
                "duration_ms": round(rnd.lognormvariate(3, 1), 3), "ua": rnd.choice(agents),
                "request_id": "%032x" % rnd.getrandbits(128)}, separators=(",", ":")) + "\n")
    return os.path.getsize(path)


def bench_archive_levels(svc, certs, work, n=500_000):
    """What the archive's gzip level buys: the agent alone to S3 at levels 1, 3 and 6 on realistic
    lines (CPU-s per million, stored bytes per line), and zstd -1/-3/-6 (the CLI) on the same
    archived text as an estimate of what zstd would store."""
    svc.create_s3_bucket("bench-archive")
    log = os.path.join(mk(work, "logs"), "real.log")
    size = write_realistic_lines(log, n)
    print("archive: %d realistic lines, %.0f bytes per line on disk" % (n, size / n))
    text_path = os.path.join(work, "archived.ndjson")
    for level in (1, 3, 6):
        agent = agent_sender(svc, certs, mk(work, "level-%d" % level), log, s3=True, s3_level=level)
        agent.start()
        wait_metric(agent, "tron_agent_lines_read_total", n, 600)
        code, cpu, hwm = stop_with_rusage(agent)
        prefix = "level-%d/" % level
        s3 = svc.s3_client()
        stored, raw = 0, 0
        with open(text_path, "wb") as f:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench-archive", Prefix=prefix):
                for obj in page.get("Contents", []):
                    body = s3.get_object(Bucket="bench-archive", Key=obj["Key"])["Body"].read()
                    stored += len(body)
                    text = gzip.decompress(body)
                    raw += len(text)
                    f.write(text)
        print("archive: agent -> S3, gzip level %d: %.2f CPU-s per million lines, %.1f stored bytes per line "
              "(%.1f:1 of %.0f archived bytes per line), exit %d" % (level, cpu * 1e6 / n, stored / n, raw / stored, raw / n, code),
              flush=True)
    if shutil.which("zstd"):
        for level in (1, 3, 6):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(["zstd", "-%d" % level, "-c", text_path], stdout=subprocess.PIPE, check=True).stdout
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            print("archive: zstd -%d CLI on the same archived text: %.2f CPU-s per million lines, %.1f bytes per line"
                  % (level, cpu * 1e6 / n, len(out) / n), flush=True)
    os.remove(text_path)


def bench_sink(svc, work, n, topic="bench-relay", fmt="csv"):
    """n records already in Kafka → gzip CSV (or NDJSON) objects in fake-gcs-server, RUNS times
    (each its own consumer group and prefix); the median of the runs is the row."""
    runs = [bench_sink_once(svc, mk(work, "run-%d" % k), n, topic, fmt, "%s-%d" % (fmt, k)) for k in range(RUNS)]
    if RUNS > 1:
        cpu, yardstick = (statistics.median(r[i] for r in runs) for i in range(2))
        print("sink: %s, median of %d runs: %.2f CPU-s per million records; gzip -6 of its rows %.2f; sink / gzip -6 = %.2f "
              "(target <= 1.5; the runs: %s)" % (fmt.upper(), RUNS, cpu * 1e6 / n, yardstick, cpu / yardstick,
                                                 ", ".join("%.2f" % (c / y) for c, y in runs)), flush=True)


def bench_sink_once(svc, work, n, topic, fmt, name):
    """One sink run; returns (CPU-s, CPU-s of `gzip -6` on the rows it wrote)."""
    svc.create_gcs_bucket("bench")
    cfg = tron.sink_config(work, svc.kafka_brokers, "gs://bench/" + name, gcs_endpoint=svc.gcs_endpoint, topic=topic,
                           group="bench-sink-" + name, name="sink-" + name)
    cfg["output"]["format"] = fmt
    cfg["output"]["columns"] = [{"name": "time", "source": "@time", "type": "TIMESTAMP"},
                                {"name": "path", "source": "path", "type": "STRING"},
                                {"name": "status", "source": "status", "type": "INTEGER"},
                                {"name": "record", "source": "@record", "type": "JSON"}]
    cfg["roll"] = {"max_records": 250000, "max_age": "30s", "idle_after": "3s"}
    sink = tron.Proc("sink", "tron-sink-secor", cfg, work)
    sink.start()
    # TRON_BENCH_PROFILE=DIR: `perf record` of the sink while it works, for the profile that
    # explains its CPU (`perf report -i DIR/sink-csv.perf`); the CPU figures then include perf's cost.
    profile = start_profile(sink, "sink-" + name)
    while metric(sink, "tron_sink_records_consumed_total") == 0:
        time.sleep(0.05)
    start = time.time()  # the group has joined and the first record arrived
    wait_metric(sink, "tron_sink_records_uploaded_total", n, 900)
    elapsed = time.time() - start
    stop_profile(profile)
    raw = n * 215
    gz = metric(sink, "tron_sink_bytes_uploaded_total")
    cpu = sink.cpu_seconds()
    hwm = sink.peak_rss_mib()
    sink.stop()
    # The yardstick: gzip at the sink's level (6) on the very bytes the sink compressed, its
    # objects' rows decompressed into one file.
    rows_path = os.path.join(work, "rows." + fmt)
    with open(rows_path, "wb") as f:
        for obj in svc.gcs_list("bench", name + "/"):
            if obj["name"].endswith(".gz"):  # data objects, not _SUCCESS, manifests or the sink's state
                f.write(gzip.decompress(svc.gcs_get("bench", obj["name"])))
    yardstick = gzip_cost(rows_path, 6)
    print("sink: gzip -6 of the same %s rows (%.0f MB): %.2f CPU-s; sink / gzip -6 = %.2f (target <= 1.5)"
          % (fmt.upper(), os.path.getsize(rows_path) / 1e6, yardstick, cpu / yardstick))
    os.remove(rows_path)
    print("sink: %d records (%.0f MB of JSON) from Kafka to gzip %s in GCS in %.1fs (first record consumed → last uploaded; includes the 3 s idle wait before the final cut) = %.0f records/s, "
          "%.1f MB/s in, %.1f MB gzip out; %.2f CPU-s (%.2f per million records, %.0f MB of input per CPU-s); "
          "peak RSS %.1f MiB"
          % (n, raw / 1e6, fmt.upper(), elapsed, n / elapsed, raw / 1e6 / elapsed, gz / 1e6, cpu, cpu * 1e6 / n, raw / 1e6 / cpu,
             hwm), flush=True)
    return cpu, yardstick


def bench_latency(svc, certs, work, seconds=60, rate=20_000):
    """Live lines at `rate`/s through the whole pipeline: event time → Kafka and → object."""
    svc.create_topic("bench-live", 3)
    svc.create_gcs_bucket("live")
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, svc.kafka_brokers, topic="bench-live"), work).start()
    sink_cfg = tron.sink_config(work, svc.kafka_brokers, "gs://live/w", gcs_endpoint=svc.gcs_endpoint,
                                topic="bench-live", group="bench-live")
    sink_cfg["roll"] = {"max_records": 100000, "max_age": "1s", "idle_after": "2s"}
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work).start()
    logs = os.path.join(work, "live")
    os.makedirs(logs)
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3l"),
                            relay.config["listen"], certs)
    cfg["state_dir"] = os.path.join(work, "live-state")
    agent = tron.Proc("agent", "tron-agent", cfg, work).start()
    total = 0
    with open(os.path.join(logs, "live.log"), "w") as f:
        end = time.time() + seconds
        while time.time() < end:
            now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
            for _ in range(rate // 10):
                f.write(record_line(total, now) + "\n")
                total += 1
            f.flush()
            time.sleep(0.1)
    wait_metric(sink, "tron_sink_records_uploaded_total", total, 120)
    k = histogram_percentiles(relay, "tron_relay_event_to_kafka_seconds")
    o = histogram_percentiles(sink, "tron_sink_event_to_object_seconds")
    fmt = lambda p: ", ".join("p%d ≤ %gs" % (q * 100, v) for q, v in sorted(p.items()))  # noqa: E731
    print("end-to-end latency at %d lines/s (%d lines): event→Kafka %s; event→GCS object (oldest record of "
          "each object) %s [histogram bucket upper bounds]" % (rate, total, fmt(k), fmt(o)))
    print("  peak RSS: agent %.1f MiB, relay %.1f MiB, sink %.1f MiB" % (agent.peak_rss_mib(), relay.peak_rss_mib(), sink.peak_rss_mib()))
    for p in (agent, relay, sink):
        p.stop()


def bench_hour_end(svc, certs, work, rate=200, lateness_s=60):
    """Hour end → `_SUCCESS` at default settings but `finalize.lateness = 60s`: live lines at `rate`/s
    from two minutes before the next hour boundary until that hour's `_SUCCESS` appears (waits for
    the boundary; up to an hour). Checks the manifest at first sight against the lines written,
    then audits the hour against the agent's archive."""
    svc.create_topic("bench-hour", 3)
    svc.create_gcs_bucket("hourend")
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, svc.kafka_brokers, topic="bench-hour"), work).start()
    sink_cfg = tron.sink_config(work, svc.kafka_brokers, "gs://hourend/w", gcs_endpoint=svc.gcs_endpoint,
                                topic="bench-hour", group="bench-hour")
    del sink_cfg["roll"]  # the shipped roll settings (max_age 60 s, idle 10 s)
    sink_cfg["finalize"] = {"lateness": "%ds" % lateness_s}
    sink_cfg["output"]["columns"].append({"name": "id", "source": "_id", "type": "STRING"})
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    archive = os.path.join(work, "archive")
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + archive, relay.config["listen"], certs)
    del cfg["files"]  # the shipped scan/checkpoint intervals
    for dest in cfg["destinations"].values():
        del dest["batch"]
    now = time.time()
    boundary = (int(now) // 3600 + 1) * 3600
    if boundary - now < 150:
        boundary += 3600
    print("hour end: waiting %.0f s for two minutes before %s" % (boundary - 120 - now, time.strftime("%H:%M", time.gmtime(boundary))))
    time.sleep(max(0, boundary - 120 - time.time()))
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work).start()
    agent = tron.Proc("agent", "tron-agent", cfg, work).start()
    hour = datetime.datetime.fromtimestamp(boundary - 3600, datetime.timezone.utc)
    prefix = "w/bench-hour/dt=%s/hr=%s/" % (hour.strftime("%Y-%m-%d"), hour.strftime("%H"))
    in_hour, total, seen = 0, 0, None
    with open(os.path.join(logs, "live.log"), "w") as f:
        while seen is None and time.time() < boundary + lateness_s + 900:
            t = time.time()
            stamp = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
            for _ in range(rate // 10):
                f.write(record_line(total, stamp) + "\n")
                total += 1
                in_hour += t < boundary
            f.flush()
            if t > boundary and int(t * 10) % 10 == 0:
                names = {o["name"] for o in svc.gcs_list("hourend", prefix)}
                if prefix + "_SUCCESS" in names:
                    seen = time.time()
                    manifest = json.loads(svc.gcs_get("hourend", prefix + "_manifest.json"))
            time.sleep(0.1)
    if seen is None:
        print("hour end: no _SUCCESS within 15 min of the hour's end")
    else:
        print("hour end → _SUCCESS: %.1f s (lateness %d s, defaults otherwise); manifest at first sight: %d rows, "
              "%d lines written for the hour; decided by %s" % (seen - boundary, lateness_s, manifest["rows"], in_hour,
                                                                  json.dumps(manifest.get("completeness"))))
        code, table, err = tron.audit(sink, "--topic", "bench-hour", "--from", hour.strftime("%Y-%m-%dT%H"),
                                      "--archive", "file://" + archive, "--tag", "app.log")
        print("audit of the hour (exit %d):\n%s%s" % (code, table, err))
    for p in (agent, relay, sink):
        p.stop()


def bench_many_files(svc, certs, work, files=4000, lines_per_file=50):
    """`files` active files at once, both destinations (S3 with its default 60 s max_age and 256 MiB
    budget, relay with acks): lines/s and the agent's peak RSS, which the per-open-batch encoder
    charge keeps within the budgets however many files there are."""
    tron.allow_open_files(files + 1024)
    svc.create_topic("bench-files", 3)
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, svc.kafka_brokers, topic="bench-files"),
                      work).start()
    logs = mk(work, "logs")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3"),
                            relay.config["listen"], certs)
    cfg["destinations"]["s3"]["batch"] = {"max_bytes": 32 << 20, "max_age": "60s", "max_inflight": 4,
                                          "max_buffer_bytes": 256 << 20}
    agent = tron.Proc("agent", "tron-agent", cfg, work).start()
    start = time.time()
    for n in range(files):
        with open(os.path.join(logs, "f%05d.log" % n), "w") as f:
            f.writelines(record_line(n * lines_per_file + i, now) + "\n" for i in range(lines_per_file))
    total = files * lines_per_file
    wait_metric(agent, "tron_agent_records_sent_total", total, 600)  # the relay's share, acked
    elapsed = time.time() - start
    print("agent, %d files × %d lines (both destinations, S3 max_age 60s): relay acked all %d lines in %.1fs "
          "= %.0f lines/s; agent peak RSS %.1f MiB (budgets: S3 256 MiB, relay 32 MiB; unbounded open "
          "encoders would need %.0f MiB), %d S3 batches sent early"
          % (files, lines_per_file, total, elapsed, total / elapsed, agent.peak_rss_mib(),
             files * 344 / 1024, metric(agent, "tron_agent_batches_sealed_early_total")))
    agent.stop(), relay.stop()


def bench_fleet(svc, certs, work, conns=2000, seconds=60, every=5.0, per_chunk=10):
    """A fleet against one relay, from a load generator: `conns` TLS connections (what every agent
    keeps open to every relay), each sending a `per_chunk`-record gzip chunk and a watermark report
    every `every` seconds and reading its acks, like an app server at per_chunk/every lines/s.
    Measures the relay's memory per connection and CPU-s per million records."""
    import asyncio
    import ssl
    svc.create_topic("bench-fleet", 3)
    cfg = tron.relay_config(work, certs, svc.kafka_brokers, topic="bench-fleet")
    # Every connection comes from 127.0.0.1: the NAT case, where the per-address cap is the knob.
    cfg["limits"] = {"max_connections": conns + 100, "max_connections_per_address": conns + 100}
    tron.allow_open_files(2 * conns + 1000)
    relay = tron.Proc("relay", "tron-relay", cfg, work).start()
    host, port = relay.config["listen"].rsplit(":", 1)
    port = int(port)
    ctx = ssl.create_default_context(cafile=certs["ca"])
    ctx.check_hostname = False
    time.sleep(2)
    def current_rss():
        with open("/proc/%d/status" % relay.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    idle_rss = current_rss()
    sent = [0]

    def frame(conn, n, tag, record):
        now = time.time()
        entries = b"".join(msgpack.packb([msgpack.ExtType(0, int(now).to_bytes(4, "big") + b"\0\0\0\0"), record(i)])
                           for i in range(n))
        cid = "f%d-%d" % (conn, sent[0])
        return msgpack.packb([tag, gzip.compress(entries, 1), {"chunk": cid, "size": n, "compressed": "gzip"}])

    async def client(conn, connected, start, stop):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        connected.append(conn)
        await start.wait()
        unpacker = msgpack.Unpacker(raw=False)
        await asyncio.sleep((conn % 100) * every / 100)  # spread the sends over the interval
        while not stop.is_set():
            now_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            writer.write(frame(conn, per_chunk, "bench.fleet",
                               lambda i: json.loads(record_line(conn * 1_000_000 + i, now_iso))))
            writer.write(frame(conn, 1, "tron.watermark", lambda i: {
                "host": "fleet-%d" % conn, "watermark_ms": int(time.time() * 1000) - 5000, "tags": ["bench.fleet"]}))
            await writer.drain()
            got = 0
            while got < 2:
                data = await reader.read(65536)
                if not data:
                    return
                unpacker.feed(data)
                got += sum(1 for _ in unpacker)
            sent[0] += per_chunk
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass
        writer.close()

    async def run():
        connected, start, stop = [], asyncio.Event(), asyncio.Event()
        tasks = []
        for c in range(conns):
            tasks.append(asyncio.create_task(client(c, connected, start, stop)))
            if c % 100 == 99:
                await asyncio.sleep(0.2)
        while len(connected) < conns:
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)
        connected_rss = current_rss()
        cpu0 = relay.cpu_seconds()
        start.set()
        await asyncio.sleep(seconds)
        stop.set()
        cpu = relay.cpu_seconds() - cpu0
        await asyncio.gather(*tasks, return_exceptions=True)
        return connected_rss, cpu

    connected_rss, cpu = asyncio.run(run())
    records = sent[0]
    wm_messages = relay.metric("tron_relay_watermark_messages_total") or 0
    reports = relay.metric("tron_relay_watermark_reports_total") or 0
    print("relay fleet: %d TLS connections (one per agent), each %d records + 1 watermark report every %.0f s "
          "(%.0f records/s in all) for %d s: relay RSS %.1f MiB idle, %.1f MiB connected (%.1f KiB per "
          "connection), peak %.1f MiB; %.2f CPU-s = %.1f%% of a core, %.2f CPU-s per million records "
          "(incl. %d watermark reports -> %d watermark messages)"
          % (conns, per_chunk, every, records / seconds, seconds, idle_rss, connected_rss,
             (connected_rss - idle_rss) * 1024 / conns, relay.peak_rss_mib(), cpu, 100 * cpu / seconds,
             cpu * 1e6 / max(records, 1), reports, wm_messages), flush=True)
    relay.stop()


def mk(work, name):
    path = os.path.join(work, name)
    os.makedirs(path, exist_ok=True)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="*", default=["agent", "senders", "rotation", "files", "relay", "sink", "latency"])
    ap.add_argument("--records", type=int, default=1_000_000)
    # This machine's speed moves run to run (one sink build's runs spread by a third): the rows
    # issue 27's targets are read from (senders, senders-live, sink) can be the median of N runs.
    ap.add_argument("--runs", type=int, default=1, help="runs of each tron row of senders, senders-live and sink")
    args = ap.parse_args()
    global RUNS
    RUNS = args.runs
    work = os.path.join(ROOT, ".run", "bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    svc = servers.Services(os.path.join(work, "services")).start()
    try:
        certs = certs_mod.make(os.path.join(work, "certs"))
        if "agent" in args.which:
            bench_agent(svc, certs, mk(work, "agent"), args.records)
        if "senders" in args.which:
            bench_senders(svc, certs, mk(work, "senders"), args.records)
        if "rotation" in args.which:
            bench_rotation(svc, certs, mk(work, "rotation"))
        delivered = None
        if "relay" in args.which or "sink" in args.which:
            delivered = bench_relay(svc, certs, mk(work, "relay"), args.records)
        if "relay" in args.which:
            bench_relay(svc, certs, mk(work, "relay-zstd"), args.records, compression="zstd", topic="bench-relay-zstd")
            bench_relay_peer(mk(work, "relay-peer"), args.records)
            bench_relay_from_fluent_bit(svc, mk(work, "relay-fb"), args.records)
        if "sink" in args.which:
            bench_sink(svc, mk(work, "sink"), delivered)
            bench_sink(svc, mk(work, "sink-ndjson"), delivered, fmt="ndjson")
        if "files" in args.which:
            bench_many_files(svc, certs, mk(work, "files"))
        if "latency" in args.which:
            bench_latency(svc, certs, mk(work, "latency"))
        if "senders-live" in args.which:
            bench_senders_live(svc, certs, mk(work, "senders-live"))
        if "archive" in args.which:  # not in the default set: the archive's gzip level trade-off
            bench_archive_levels(svc, certs, mk(work, "archive"))
        if "fleet" in args.which:  # not in the default set: 2,000 connections from this machine
            bench_fleet(svc, certs, mk(work, "fleet"))
        if "hour-end" in args.which:  # not in the default set: it waits for an hour boundary
            bench_hour_end(svc, certs, mk(work, "hour-end"))
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
