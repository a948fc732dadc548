"""Hostile or broken clients are refused, logged with their address and counted, while a
well-behaved client on the same relay keeps getting its chunks acked."""
import gzip
import json
import os
import socket
import ssl
import threading
import time

import msgpack

import certs as certs_mod
import tron


def tls_client(certs, host, port, cert=None):
    ctx = ssl.create_default_context(cafile=certs["ca"])
    if cert:
        ctx.load_cert_chain(cert[0], cert[1])
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def send_and_wait_ack(sock, chunk_id):
    frame = msgpack.packb(["good.client", [[1795300000, {"ok": True}]], {"chunk": chunk_id}])
    sock.sendall(frame)
    unpacker = msgpack.Unpacker(raw=False)
    deadline = time.time() + 20
    while time.time() < deadline:
        data = sock.recv(4096)
        if not data:
            return None
        unpacker.feed(data)
        for obj in unpacker:
            return obj
    return None


class KeepSending(threading.Thread):
    """A good client sending a chunk every `every` seconds on `sock` until stopped; `acked` and
    `failures` hold what came back for each."""

    def __init__(self, sock, prefix, every):
        super().__init__()
        self.sock, self.prefix, self.every = sock, prefix, every
        self.stopping, self.acked, self.failures = threading.Event(), [], []
        self.start()

    def run(self):
        n = 0
        while not self.stopping.is_set():
            n += 1
            chunk = "%s%d" % (self.prefix, n)
            ack = send_and_wait_ack(self.sock, chunk)
            (self.acked if ack == {"ack": chunk} else self.failures).append(ack)
            time.sleep(self.every)

    def stop(self):
        self.stopping.set()
        self.join()


def closed_by_peer(sock, timeout=10):
    """True once the relay closes the connection (a TLS alert before the close is fine)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except socket.timeout:
        return False
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


def each_closed_after_sending(sockets, frames, timeout, refused_early=False):
    """Sends `frames[i % len(frames)]` on the i-th socket, then asserts the relay closes every one.
    `refused_early`: a connection the relay already closed (refused from its first bytes) may fail
    the send."""
    for i, s in enumerate(sockets):
        try:
            s.sendall(frames[i % len(frames)])
        except OSError:
            if not refused_early:
                raise
    for s in sockets:
        assert closed_by_peer(s, timeout=timeout)


def wait_for_open_connections(relay, at_most, timeout=10):
    """Waits until the relay counts at most `at_most` open connections (it frees a slot before it
    stops counting the connection), so the next connection finds the slots the test expects."""
    deadline = time.time() + timeout
    while True:
        open_now = relay.metric("tron_relay_connections") or 0.0
        if open_now <= at_most:
            return
        assert time.time() < deadline, "relay still counts %s open connections" % open_now
        time.sleep(0.05)


def counter(relay, name, reason):
    for line in relay.metrics().splitlines():
        if line.startswith(name) and 'reason="%s"' % reason in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_abusive_clients_are_refused_and_counted_while_good_ones_are_served(services, certs, workroot, procs):
    work = os.path.join(workroot, "abuse")
    os.makedirs(work)
    services.create_topic("abuse", 1)
    cfg = tron.relay_config(work, certs, services.kafka_brokers, topic="abuse")
    cfg["tls"]["client_ca"] = certs["ca"]
    cfg["limits"] = {"max_frame_bytes": 1 << 20, "max_decompressed_bytes": 4 << 20, "max_inflight_bytes": 8 << 20,
                     "handshake_timeout": "2s"}
    relay = tron.Proc("relay", "tron-relay", cfg, work)
    procs.append(relay)
    relay.start()
    host, port = cfg["listen"].rsplit(":", 1)
    port = int(port)
    good_cert = (certs["client_cert"], certs["client_key"])
    good = tls_client(certs, host, port, good_cert)
    assert send_and_wait_ack(good, "before") == {"ack": "before"}

    # 1. Plaintext Forward on the TLS port.
    raw = socket.create_connection((host, port), timeout=10)
    raw.sendall(msgpack.packb(["plain", 1795300000, {"a": 1}]))
    assert closed_by_peer(raw)

    # 2. A client certificate from another CA (mutual TLS).
    other = certs_mod.make(os.path.join(work, "other-ca"), name="intruder")
    try:
        s = tls_client(certs, host, port, (other["client_cert"], other["client_key"]))
        assert closed_by_peer(s)
    except (ssl.SSLError, ConnectionResetError, OSError):
        pass  # refused during the handshake

    # 3. A gzip bomb: 100 MiB of entries compressed to ~100 KiB, over the 4 MiB decompressed limit.
    entries = msgpack.packb([1795300000, {"m": "0" * (1 << 20)}]) * 100
    bomb = msgpack.packb(["bomb", gzip.compress(entries, 9), {"chunk": "boom", "compressed": "gzip"}])
    assert len(bomb) < (1 << 20)
    s = tls_client(certs, host, port, good_cert)
    s.sendall(bomb)
    assert closed_by_peer(s)

    # 4. Garbage MessagePack.
    s = tls_client(certs, host, port, good_cert)
    s.sendall(b"\xc1\xc1\xc1\xc1")
    assert closed_by_peer(s)

    # 5. A frame over max_frame_bytes, refused from its header alone.
    s = tls_client(certs, host, port, good_cert)
    s.sendall(b"\x93\xa1t\xc6\x10\x00\x00\x00")  # [ "t", bin32 of 256 MiB ...
    assert closed_by_peer(s)

    time.sleep(1)
    assert counter(relay, "tron_relay_connections_refused_total", "tls") >= 2
    assert counter(relay, "tron_relay_frames_rejected_total", "decompressed_too_large") == 1
    assert counter(relay, "tron_relay_frames_rejected_total", "invalid_msgpack") == 1
    assert counter(relay, "tron_relay_frames_rejected_total", "frame_too_large") == 1
    log = relay.tail(20000)
    assert "max_decompressed_bytes=4194304" in log and "peer=127.0.0.1:" in log
    # The well-behaved client was never disturbed.
    assert send_and_wait_ack(good, "after") == {"ack": "after"}
    good.close()


def forward_handshake(sock, shared_key, hostname="abuse-test"):
    """The Forward v1 shared-key handshake as a client: HELO in, PING out, PONG in."""
    import hashlib
    unpacker = msgpack.Unpacker(raw=False)

    def read_one():
        while True:
            for obj in unpacker:
                return obj
            data = sock.recv(4096)
            if not data:
                return None
            unpacker.feed(data)

    helo = read_one()
    assert helo and helo[0] == "HELO", helo
    nonce = helo[1]["nonce"]
    nonce = nonce if isinstance(nonce, bytes) else nonce.encode()
    salt = os.urandom(8).hex().encode()
    digest = hashlib.sha512(salt + hostname.encode() + nonce + shared_key.encode()).hexdigest()
    sock.sendall(msgpack.packb(["PING", hostname, salt, digest, "", ""]))
    return read_one()


def test_handshake_idle_and_connection_limits_refuse_while_a_good_client_delivers(services, certs, workroot, procs):
    work = os.path.join(workroot, "abuse-limits")
    os.makedirs(work)
    services.create_topic("abuse-limits", 1)
    cfg = tron.relay_config(work, certs, services.kafka_brokers, topic="abuse-limits", shared_key="s3cret")
    cfg["limits"] = {"max_connections": 4, "handshake_timeout": "2s", "idle_timeout": "3s"}
    relay = tron.Proc("relay", "tron-relay", cfg, work)
    procs.append(relay)
    relay.start()
    host, port = cfg["listen"].rsplit(":", 1)
    port = int(port)

    good = tls_client(certs, host, port)
    assert forward_handshake(good, "s3cret")[1] is True
    assert send_and_wait_ack(good, "g1") == {"ack": "g1"}
    # The good client sends a chunk every 0.5 s throughout (so it is never idle) and every one
    # must be acked.
    sender = KeepSending(good, "k", 0.5)

    # A wrong shared key: PONG says no, the connection is closed, the peer is logged.
    s = tls_client(certs, host, port)
    pong = forward_handshake(s, "guess")
    assert pong[0] == "PONG" and pong[1] is False, pong
    assert closed_by_peer(s)

    # Connection cap: 3 silent TLS clients fill the remaining slots; a 5th connection takes the
    # slot of the oldest one that has not authenticated, which is closed at once.
    silent = [tls_client(certs, host, port) for _ in range(3)]
    began = time.time()
    extra = socket.create_connection((host, port), timeout=10)
    assert closed_by_peer(silent[0], timeout=5) and time.time() - began < 2

    # Handshake time-out: the other silent clients never answer HELO; each is closed after ~2 s.
    for s in silent[1:] + [extra]:
        assert closed_by_peer(s, timeout=10)
    assert time.time() - began < 8

    # When every slot is held by an authenticated client, a newcomer is refused.
    wait_for_open_connections(relay, 1)
    talking = [tls_client(certs, host, port) for _ in range(3)]
    for s in talking:
        assert forward_handshake(s, "s3cret")[1] is True
    refused = socket.create_connection((host, port), timeout=10)
    assert closed_by_peer(refused, timeout=5)
    for s in talking:
        s.close()
    # The relay frees their slots when it reads their close; until then a newcomer is refused.
    wait_for_open_connections(relay, 1)

    # A TCP client that never starts TLS is dropped by the same time-out.
    began = time.time()
    mute = socket.create_connection((host, port), timeout=10)
    assert closed_by_peer(mute, timeout=10) and 1.5 < time.time() - began < 8

    # Idle time-out: an authenticated client that sends nothing for 3 s is closed.
    idle = tls_client(certs, host, port)
    assert forward_handshake(idle, "s3cret")[1] is True
    began = time.time()
    assert closed_by_peer(idle, timeout=15) and 2.5 < time.time() - began < 10

    time.sleep(0.5)
    assert counter(relay, "tron_relay_connections_refused_total", "connection_limit") >= 1
    assert counter(relay, "tron_relay_connections_closed_total", "evicted_silent") >= 1
    assert counter(relay, "tron_relay_connections_refused_total", "handshake") >= 3
    assert counter(relay, "tron_relay_connections_refused_total", "tls_timeout") >= 1
    log = relay.tail(20000)
    assert "handshake refused peer=127.0.0.1:" in log and "shared_key mismatch" in log, log
    # The good client kept its slot and every chunk it sent meanwhile was acked.
    sender.stop()
    assert not sender.failures and len(sender.acked) >= 10, (len(sender.acked), sender.failures)
    good.close()


def test_records_kafka_can_never_take_are_dead_lettered_and_their_chunk_acked(services, certs, workroot, procs):
    work = os.path.join(workroot, "dead-letter")
    relay, sink, host, port = tron.relay_to_gcs(
        services, certs, work, procs, "dead-letter", "dead-letter", 1,
        kafka={"brokers": services.kafka_brokers, "default_topic": "dead-letter", "linger": "5ms",
               "properties": {"message.max.bytes": "20000"}})
    s = tls_client(certs, host, port)
    # Event times of a minute ago: the relay stamps Kafka records with their receive time, and the
    # sink quarantines event times further than quarantine.max_past (7 days) before it.
    now = int(time.time()) - 60
    ids = ["%032x" % (0xdead0 + i) for i in range(3)]  # tron-agent's line ids, for the audit below
    entries = [[now, {"seq": 0, "msg": "small", "_id": ids[0]}], [now + 1, {"seq": 1, "msg": "x" * 50000, "_id": ids[1]}],
               [now + 2, {"seq": 2, "msg": "small", "_id": ids[2]}]]
    s.sendall(msgpack.packb(["big.one", entries, {"chunk": "dl-1"}]))
    unpacker = msgpack.Unpacker(raw=False)
    s.settimeout(20)
    unpacker.feed(s.recv(4096))
    assert next(unpacker) == {"ack": "dl-1"}
    s.close()

    with open(relay.config["dead_letter"]["path"]) as f:
        dead = [json.loads(line) for line in f]
    assert len(dead) == 1, dead
    assert dead[0]["record"]["seq"] == 1 and len(dead[0]["record"]["msg"]) == 50000
    assert "too large" in dead[0]["reason"] and dead[0]["tag"] == "big.one" and dead[0]["topic"] == "dead-letter"
    assert counter(relay, "tron_relay_records_dead_lettered_total", "too_large") == 1

    def seqs():
        rows = []
        for obj in services.gcs_list("dead-letter", "w/dead-letter/"):
            if not obj["name"].rsplit("/", 1)[1].startswith("_"):
                rows.extend(tron.read_gz_lines(services.gcs_get("dead-letter", obj["name"])))
        return rows

    tron.wait_until("the two deliverable records in Kafka", lambda: len(seqs()) >= 2, timeout=60, interval=1,
                    on_timeout=sink.tail)
    assert len(seqs()) == 2

    # The audit against an archive holding all three lines (what the agent's S3 destination
    # keeps): the one missing in GCS is explained by the relay's own dead-letter file.
    hour = time.gmtime(now)
    hour_dir = time.strftime("dt=%Y-%m-%d/hr=%H", hour)
    services.create_s3_bucket("dead-letter-archive")
    lines = "".join(json.dumps({"_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + i)), "_id": ids[i],
                                "seq": i}) + "\n" for i in range(3))
    services.s3_client().put_object(Bucket="dead-letter-archive", Key="arch/big.one/%s/a.ndjson.gz" % hour_dir,
                                    Body=gzip.compress(lines.encode()))
    args = ["--topic", "dead-letter", "--from", time.strftime("%Y-%m-%dT%H", hour), "--archive",
            "s3://dead-letter-archive/arch", "--tag", "big.one", "--s3-endpoint", services.s3_endpoint, "--json"]
    env = dict(tron.servers.S3_CREDENTIALS)
    code, out, err = tron.audit(sink, *args, "--dead-letters", relay.config["dead_letter"]["path"], env=env)
    (report,) = [json.loads(line) for line in out.splitlines()]
    print("audit with the relay's dead letters: %s" % report)
    assert code == 1 and report["missing_in_gcs"] == 1, (code, out, err)
    ((reason, count),) = report["missing_in_gcs_dead_lettered"].items()
    assert count == 1 and "too large" in reason, report
    # Without the file the line is missing all the same, unexplained; a file that is not one is named.
    code, out, err = tron.audit(sink, *args, env=env)
    assert code == 1 and json.loads(out)["missing_in_gcs_dead_lettered"] == {}, (code, out, err)
    code, out, err = tron.audit(sink, *args, "--dead-letters", relay.config_path, env=env)
    assert code == 2 and relay.config_path in err and "line 1" in err, (code, err)
