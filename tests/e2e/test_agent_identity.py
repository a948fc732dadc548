"""File identity cases of the agent against moto S3: a file deleted while the agent still has
lines of it to ship is read to its end from the open descriptor; a new file at the same path (the
inode number is likely reused) is a new identity shipped in full; a file with no complete first
line yet is waited for, then read whole."""
import json
import os
import time

import tron
from test_outage import s3_seqs


def test_deleted_file_is_finished_and_a_reused_path_is_a_new_file(services, certs, workroot, procs):
    work = os.path.join(workroot, "identity")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_s3_bucket("identity")
    gate = tron.Gate(services.s3_port).open()
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "s3://identity/a", None, certs,
                            s3_endpoint=gate.endpoint)
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
    tron.wait_until("the agent following app.log", lambda: "following file" in agent.tail(), timeout=20, interval=0.2)
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
                    lambda: s3_seqs(services, "identity") >= set(range(70_001)), timeout=120, interval=2,
                    on_timeout=agent.tail)
    assert s3_seqs(services, "identity") == set(range(70_001))
    print("identity: deleted file shipped to its end; new file at the same path (inode reused: %s) shipped in full; "
          "a first line completed later shipped once" % reused)
    assert agent.stop() == 0
    gate.close()
