"""The relay under hostile load, at the limits a user ships (no `[limits]` in the config): silent
connections cannot take every slot, and nothing an unauthenticated peer sends is decompressed or
decoded. A well-behaved client (PyPI fluent-logger, or the raw Forward helpers) keeps getting
acks throughout; memory is read from /proc."""
import gzip
import os
import socket
import threading
import time

import msgpack

import tron
from test_relay_abuse import (KeepSending, closed_by_peer, counter, each_closed_after_sending, forward_handshake,
                              send_and_wait_ack)

SILENT = int(os.environ.get("TRON_RELAY_SILENT_CONNECTIONS", "1100"))


def plaintext_relay(services, certs, work, topic, **extra):
    os.makedirs(work)
    services.create_topic(topic, 1)
    cfg = tron.relay_config(work, certs, services.kafka_brokers, topic=topic, plaintext=True, **extra)
    relay = tron.Proc("relay", "tron-relay", cfg, work)
    host, port = cfg["listen"].rsplit(":", 1)
    return relay, host, int(port)


def test_silent_connections_from_one_address_cannot_lock_a_good_client_out(services, certs, workroot, procs):
    """1,100 TCP connections that send nothing, from 127.0.0.1, against the default 1,024
    connections and 256 per address: a client from the same address still connects, and its
    chunk is acked within 15 s (each newcomer takes the slot of the oldest silent connection)."""
    tron.allow_open_files(SILENT + 512)
    relay, host, port = plaintext_relay(services, certs, os.path.join(workroot, "silent"), "silent")
    procs.append(relay)
    relay.start()
    silent = []
    try:
        for _ in range(SILENT):
            silent.append(socket.create_connection((host, port), timeout=10))
        began = time.time()
        good = socket.create_connection((host, port), timeout=15)
        good.settimeout(15)
        ack = send_and_wait_ack(good, "through")
        waited = time.time() - began
        assert ack == {"ack": "through"}, ack
        good.close()
    finally:
        for s in silent:
            s.close()
    evicted = counter(relay, "tron_relay_connections_closed_total", "evicted_silent")
    print("silent connections: %d from one address; a good client acked after %.1fs; evicted: %d"
          % (SILENT, waited, evicted))
    assert waited < 15, "acked only after %.1fs" % waited
    assert evicted >= 1


def amplifying_frame():
    """About 60 KB on the wire: one CompressedPackedForward entry whose record is a map of 30
    million small-integer pairs (60 MB inflated; decoded into value trees, gigabytes)."""
    pairs = 30_000_000
    body = bytearray(b"\x92\xd7\x00" + (1795300000).to_bytes(4, "big") + b"\x00\x00\x00\x00")
    body += b"\xdf" + pairs.to_bytes(4, "big")
    body += b"\x01\x02" * pairs
    packed = gzip.compress(bytes(body), 9)
    return msgpack.packb(["amplify", packed, {"compressed": "gzip", "chunk": "boom"}], use_bin_type=True)


def test_amplifying_frames_before_and_after_the_handshake_keep_memory_bounded(services, certs, workroot, procs):
    """A relay with a shared key at default limits. 96 connections each send a small gzip chunk
    that inflates into 30 million map pairs, before any handshake: each is closed and counted
    (`before_handshake`) having been read no further than its header. Then 32 connections that
    completed the handshake send it: each chunk is refused while it decodes (the inflated size or
    the element count passes its limit; at most two chunks decode at once) and counted. Relay
    RSS stays under 256 MiB throughout, and an authenticated client keeps getting acks."""
    key_file = os.path.join(workroot, "preauth-shared-key")
    with open(key_file, "w") as f:
        f.write("s3cret\n")  # read from a file, as with systemd LoadCredential=
    relay, host, port = plaintext_relay(services, certs, os.path.join(workroot, "preauth"), "preauth",
                                        security={"shared_key_file": key_file})
    procs.append(relay)
    relay.start()
    good = socket.create_connection((host, port), timeout=10)
    assert forward_handshake(good, "s3cret")[1] is True
    assert send_and_wait_ack(good, "g0") == {"ack": "g0"}
    frame = amplifying_frame()
    sender = KeepSending(good, "g", 0.2)
    peak = 0.0
    try:
        for _ in range(3):
            hostile = [socket.create_connection((host, port), timeout=10) for _ in range(32)]
            each_closed_after_sending(hostile, [frame], timeout=10, refused_early=True)
            peak = max(peak, relay.peak_rss_mib())
        authenticated = []
        for _ in range(32):
            s = socket.create_connection((host, port), timeout=10)
            assert forward_handshake(s, "s3cret")[1] is True
            authenticated.append(s)
        each_closed_after_sending(authenticated, [frame], timeout=60)
        peak = max(peak, relay.peak_rss_mib())
        tron.wait_until("a few more acks for the good client", lambda: len(sender.acked) >= 5, timeout=30)
    finally:
        sender.stop()
    refused = counter(relay, "tron_relay_connections_refused_total", "before_handshake")
    rejected = (counter(relay, "tron_relay_frames_rejected_total", "decompressed_too_large")
                + counter(relay, "tron_relay_frames_rejected_total", "too_many_elements"))
    print("amplification: %d KB frame x 96 connections before the handshake (refused: %d) and x 32 after it "
          "(rejected while decoding: %d); relay peak RSS %.0f MiB; good client acks meanwhile: %d"
          % (len(frame) // 1024, refused, rejected, peak, len(sender.acked)))
    assert refused >= 96
    assert rejected >= 32
    assert peak <= 256, "relay peak RSS %.0f MiB" % peak
    assert not sender.failures and sender.acked, (len(sender.acked), sender.failures)


def test_one_connection_holds_at_most_its_share_of_the_budget(services, certs, workroot, procs):
    """Kafka unreachable, default limits (256 MiB budget, 64 MiB per connection). One client sends
    chunks as fast as the relay reads them: what it holds unacked stops at its share (plus one
    chunk), and a second client's chunks are still taken in."""
    work = os.path.join(workroot, "share")
    os.makedirs(work)
    dead = "127.0.0.1:%d" % tron.servers.free_port()
    cfg = tron.relay_config(work, certs, dead, topic="share", plaintext=True)
    cfg["kafka"]["delivery_timeout"] = "120s"
    relay = tron.Proc("relay", "tron-relay", cfg, work)
    procs.append(relay)
    relay.start()
    host, port = cfg["listen"].rsplit(":", 1)

    def chunk(client, n):
        entries = [[1795300000 + i, {"c": client, "seq": n * 400 + i, "pad": "p" * 160}] for i in range(400)]
        return msgpack.packb(["share", entries, {"chunk": "c%d-%d" % (client, n), "size": 400}])

    def flood(client, count):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.settimeout(60)
        try:
            for n in range(count):
                s.sendall(chunk(client, n))
        except OSError:
            pass  # the relay stopped reading: that is the point
        return s

    def inflight():
        return relay.metric("tron_relay_inflight_bytes") or 0

    def settled():
        before = inflight()
        time.sleep(2)
        return before if before > 0 and inflight() == before else None

    a = threading.Thread(target=flood, args=(1, 400), daemon=True)
    a.start()
    one = tron.wait_until("the first client's unacked bytes to stop growing", settled, timeout=60)
    b = threading.Thread(target=flood, args=(2, 20), daemon=True)
    b.start()
    both = tron.wait_until("the second client's chunks to be taken in", lambda: inflight() > one + (4 << 20) and inflight(),
                           timeout=30)
    print("per-connection share: one client holds %.1f MiB unacked (share 64 MiB), with a second one %.1f MiB"
          % (one / (1 << 20), both / (1 << 20)))
    assert (32 << 20) < one <= (64 << 20) + (1 << 20), one


def packed_forward_frame(tag, chunk_id, size):
    """An uncompressed PackedForward frame of about `size` bytes of ~1 KB records."""
    entry = msgpack.packb([1795300000, {"pad": "p" * 1000}])
    body = entry * (size // len(entry))
    return msgpack.packb([tag, body, {"chunk": chunk_id}], use_bin_type=True)


def test_slow_senders_of_large_frames_cannot_hold_memory_or_the_door(services, certs, workroot, procs):
    """At default limits, 48 connections each send a small chunk (acked), then all but the last
    100 bytes of a 15 MiB frame, and then stall (a slow-loris on the read buffers: 720 MiB if the relay held each frame as it
    arrived). Frames being received are charged to `max_receiving_bytes` (64 MiB): relay RSS stays
    under 256 MiB, connections that cannot get room within `handshake_timeout` are closed
    (`receive_budget`), and those holding room are closed when their frame has not arrived whole
    within `frame_timeout` (`slow_frame`). A client sending small chunks is acked throughout, and
    a client sending 2 MiB chunks is acked once the stalled frames are gone."""
    relay, host, port = plaintext_relay(services, certs, os.path.join(workroot, "slow-frames"), "slow-frames")
    procs.append(relay)
    relay.start()
    good = socket.create_connection((host, port), timeout=10)
    assert send_and_wait_ack(good, "g0") == {"ack": "g0"}
    sender = KeepSending(good, "g", 0.2)
    partial = packed_forward_frame("slow", "stalled", 15 << 20)[:-100]
    slow = [socket.create_connection((host, port), timeout=10) for _ in range(48)]
    for n, s in enumerate(slow):
        # A first frame proves the connection (no handshake_timeout for its next one).
        assert send_and_wait_ack(s, "first-%d" % n) == {"ack": "first-%d" % n}

    def send_partial(s):
        s.settimeout(120)  # the relay stops reading a connection waiting for room: the send blocks
        try:
            s.sendall(partial)
        except OSError:
            pass  # closed by the relay while sending

    threads = [threading.Thread(target=send_partial, args=(s,), daemon=True) for s in slow]
    peak = 0.0
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while time.time() < deadline:
            peak = max(peak, relay.peak_rss_mib())
            time.sleep(0.5)
        for s in slow:
            assert closed_by_peer(s, timeout=120), "a stalled frame kept its connection open"
        peak = max(peak, relay.peak_rss_mib())
        big = socket.create_connection((host, port), timeout=10)
        big.settimeout(30)
        big.sendall(packed_forward_frame("big.client", "big-1", 2 << 20))
        reply = msgpack.Unpacker(raw=False)
        reply.feed(big.recv(4096))
        assert next(reply) == {"ack": "big-1"}
        big.close()
    finally:
        sender.stop()
        for s in slow:
            s.close()
    starved = counter(relay, "tron_relay_connections_closed_total", "receive_budget")
    trickled = counter(relay, "tron_relay_connections_closed_total", "slow_frame")
    print("slow senders: 48 x 15 MiB partial frames; relay peak RSS %.0f MiB; closed for want of room %d, "
          "for a frame past frame_timeout %d; good client acks meanwhile %d"
          % (peak, starved, trickled, len(sender.acked)))
    assert peak <= 256, "relay peak RSS %.0f MiB" % peak
    assert starved >= 1 and trickled >= 1, (starved, trickled)
    assert starved + trickled == 48, "only the 48 stalled connections may be closed: %d" % (starved + trickled)
    assert not sender.failures and len(sender.acked) >= 20, (len(sender.acked), sender.failures)
