"""File identity cases of the agent against moto S3: a file deleted while the agent still has
lines of it to ship is read to its end from the open descriptor; a new file at the same path (the
inode number is likely reused) is a new identity shipped in full; a file with no complete first
line yet is waited for, then read whole."""
import json
import os
import time

import tron


def gated_s3_agent(services, certs, workroot, name):
    """An S3-only agent config for bucket `name`, its S3 reached through a gate the test can close;
    returns (work dir, log dir, gate, config)."""
    work = os.path.join(workroot, name)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_s3_bucket(name)
    gate = tron.Gate(services.s3_port).open()
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "s3://%s/a" % name, None, certs,
                            s3_endpoint=gate.endpoint)
    return work, logs, gate, cfg


def test_deleted_file_is_finished_and_a_reused_path_is_a_new_file(services, certs, workroot, procs):
    work, logs, gate, cfg = gated_s3_agent(services, certs, workroot, "identity")
    cfg["destinations"]["s3"]["batch"].update(max_bytes=256 << 10, max_age="200ms", max_inflight=1,
                                              max_buffer_bytes=1 << 20)
    agent = tron.Proc("agent", "tron-agent", cfg, work, env=dict(tron.servers.S3_CREDENTIALS))
    procs.append(agent)
    agent.start()

    def write(path, first, n):
        with open(path, "a") as f:
            for seq in range(first, first + n):
                f.write(json.dumps({"seq": seq, "pad": "d" * 100}) + "\n")

    path = os.path.join(logs, "app.log")
    gate.close()  # S3 unreachable: the agent cannot get far into the file before it is deleted
    write(path, 0, 50_000)
    inode_before = os.stat(path).st_ino
    tron.wait_until("the agent following app.log", lambda: "following file path=%s " % path in agent.tail(),
                    timeout=20, interval=0.2, on_timeout=agent.tail)
    os.unlink(path)
    time.sleep(2)  # a scan or two notice the path is gone
    write(path, 50_000, 20_000)  # a new file at the same path
    reused = os.stat(path).st_ino == inode_before
    partial = os.path.join(logs, "partial.log")
    with open(partial, "w") as f:
        f.write('{"seq": 70000, "pad": "no newline yet')
    time.sleep(1.5)
    gate.open()
    time.sleep(1.5)
    with open(partial, "a") as f:
        f.write('"}\n')
    tron.wait_until("every line of the deleted file, the new file and the late first line",
                    lambda: tron.s3_seqs(services, "identity") >= set(range(70_001)), timeout=120, interval=2,
                    on_timeout=agent.tail)
    assert tron.s3_seqs(services, "identity") == set(range(70_001))
    print("identity: deleted file shipped to its end; new file at the same path (inode reused: %s) shipped in full; "
          "a first line completed later shipped once" % reused)
    assert agent.stop() == 0
    gate.close()


def test_rotated_file_is_given_up_after_max_rotated_keep_logged_and_counted(services, certs, workroot, procs):
    work, logs, gate, cfg = gated_s3_agent(services, certs, workroot, "given-up")
    cfg["files"]["max_rotated_keep"] = "3s"
    agent = tron.Proc("agent", "tron-agent", cfg, work, env=dict(tron.servers.S3_CREDENTIALS))
    procs.append(agent)
    agent.start()
    gate.close()  # S3 unreachable before the file exists: nothing of it can be delivered
    path = os.path.join(logs, "app.log")
    with open(path, "w") as f:
        f.writelines(json.dumps({"seq": i}) + "\n" for i in range(1000))
    tron.wait_until("the agent following app.log", lambda: "following file path=%s " % path in agent.tail(),
                    timeout=20, interval=0.2, on_timeout=agent.tail)
    os.rename(path, path + ".1")  # rotated away; `*.log` no longer matches it
    with open(path, "w") as f:
        f.writelines(json.dumps({"seq": i}) + "\n" for i in range(1000, 1100))
    tron.wait_until("the agent giving up on the rotated file", lambda: "giving up on rotated file" in agent.tail(),
                    timeout=30, interval=0.5, on_timeout=agent.tail)
    given_up = [line for line in agent.tail().splitlines() if "giving up on rotated file" in line]
    assert len(given_up) == 1 and path + ".1" in given_up[0] and "destination=\"s3\"" in given_up[0], given_up
    lost = [line for line in agent.metrics().splitlines()
            if line.startswith("tron_agent_lost_bytes_total{") and 'reason="rotated_given_up"' in line]
    assert lost and 'destination="s3"' in lost[0] and float(lost[0].rsplit(" ", 1)[1]) > 0, agent.metrics()
    gate.open()
    tron.wait_until("the new file shipped", lambda: tron.s3_seqs(services, "given-up") >= set(range(1000, 1100)),
                    timeout=60, interval=1, on_timeout=agent.tail)
    assert agent.stop() == 0
    gate.close()


def test_read_from_end_skips_only_what_existed_at_the_first_start(services, certs, workroot, procs):
    """`read_from = "end"` skips the content files hold at the agent's first start (logged and
    counted), and nothing else: a file created while the agent was stopped, and the new file a
    rotation during the downtime left behind, are read from their beginning."""
    work, logs, gate, cfg = gated_s3_agent(services, certs, workroot, "from-end")
    cfg["sources"][0]["read_from"] = "end"
    path = os.path.join(logs, "app.log")

    def write(path, seqs):
        with open(path, "a") as f:
            f.writelines(json.dumps({"seq": s, "pad": "e" * 40}) + "\n" for s in seqs)

    write(path, range(100))  # history present at the first start: skipped
    skipped_bytes = os.path.getsize(path)
    agent = tron.Proc("agent", "tron-agent", cfg, work, env=dict(tron.servers.S3_CREDENTIALS))
    procs.append(agent)
    agent.start()
    tron.wait_until("the agent following app.log", lambda: "following file path=%s " % path in agent.tail(),
                    timeout=20, interval=0.2, on_timeout=agent.tail)
    assert agent.metric("tron_agent_bytes_skipped_total", reason="read_from_end") == skipped_bytes
    write(path, range(100, 110))
    tron.wait_until("lines written after the start", lambda: tron.s3_seqs(services, "from-end") >= set(range(100, 110)),
                    timeout=60, interval=1, on_timeout=agent.tail)
    assert agent.stop() == 0

    os.rename(path, path + ".1")  # rotated while the agent is down
    write(path + ".1", range(110, 113))  # the old file's last lines, written after the rename
    write(path, range(113, 120))  # the 7 lines of the issue, in the new app.log
    write(os.path.join(logs, "other.log"), range(120, 125))  # a file that did not exist before
    agent.start()
    tron.wait_until("every line written during the downtime", lambda: tron.s3_seqs(services, "from-end") >= set(range(100, 125)),
                    timeout=60, interval=1, on_timeout=agent.tail)
    assert tron.s3_seqs(services, "from-end") == set(range(100, 125))
    assert agent.metric("tron_agent_bytes_skipped_total", reason="read_from_end") in (None, 0)
    assert agent.stop() == 0
    gate.close()
