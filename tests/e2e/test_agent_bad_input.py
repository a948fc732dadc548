"""Bad input on an app server: a 10 MB line, a binary file, invalid UTF-8, an unreadable file, a
directory and a FIFO where log files are expected. Each gets a log line naming the path and a
counter; nothing readable is dropped; the agent keeps shipping the well-behaved file."""
import gzip
import json
import os
import random
import shutil
import stat

import tron


def archived(root):
    records = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):  # {host}-{fingerprint}-{first offset}: a file's objects in order
            if name.endswith(".ndjson.gz"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    records.extend(json.loads(line) for line in gzip.decompress(f.read()).decode().split("\n") if line)
    return records


def metric(text, name):
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_bad_input_is_named_counted_and_does_not_stop_the_good_file(workroot, certs, procs):
    work = os.path.join(workroot, "bad-input")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    archive = os.path.join(work, "s3")
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + archive, None, certs)
    cfg["sources"][0].update(parser="raw", max_line_bytes=1 << 20)
    cfg["destinations"]["s3"]["batch"]["max_age"] = "300ms"
    # Root reads any file whatever its mode; run the agent as nobody so "unreadable" is real.
    wrapper = ()
    if os.geteuid() == 0:
        wrapper = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        d = workroot
        while d not in ("/", "/tmp"):  # pytest's temporary directories are 0700
            os.chmod(d, os.stat(d).st_mode | 0o755)
            d = os.path.dirname(d)
        os.chmod(work, 0o777)
        for d in (archive, cfg["state_dir"], logs):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o777)
    agent = tron.Proc("agent", "tron-agent", cfg, work, wrapper=wrapper)
    procs.append(agent)

    good = os.path.join(logs, "good.log")
    with open(good, "w") as f:
        f.writelines("good line %d\n" % i for i in range(1000))
    huge_line = "".join(random.Random(1).choice("abcdefghij") for _ in range(10 << 20))
    with open(os.path.join(logs, "huge.log"), "w") as f:
        f.write(huge_line + "\nafter the huge line\n")
    rng = random.Random(2)
    with open(os.path.join(logs, "binary.log"), "wb") as f:
        f.write(b"binary header\n" + bytes(rng.randrange(256) for _ in range(256 << 10)) + b"\n")
    with open(os.path.join(logs, "latin1.log"), "wb") as f:
        f.write(b"caf\xe9 au lait\nna\xefve\n")
    secret = os.path.join(logs, "secret.log")
    with open(secret, "w") as f:
        f.write("you cannot read me\n")
    os.chmod(secret, 0)
    os.mkdir(os.path.join(logs, "dir.log"))
    os.mkfifo(os.path.join(logs, "pipe.log"))
    agent.start()

    with open(good, "a") as f:
        f.writelines("good line %d\n" % i for i in range(1000, 2000))

    def good_done():
        return sum(1 for r in archived(archive) if r["message"].startswith("good line")) >= 2000

    tron.wait_until("the good file archived", good_done, timeout=60, interval=0.5, on_timeout=agent.tail)
    tron.wait_until("the huge file archived", lambda: any(r["message"] == "after the huge line"
                                                          for r in archived(archive)), timeout=60, interval=0.5)
    records = archived(archive)
    assert sorted(int(r["message"].split()[-1]) for r in records if r["message"].startswith("good line")) == \
        list(range(2000))
    huge_parts = [r for r in records if r["file"].endswith("huge.log") and r["message"] != "after the huge line"]
    assert len(huge_parts) == 10, len(huge_parts)   # 10 MiB at max_line_bytes = 1 MiB
    assert "".join(r["message"] for r in huge_parts) == huge_line, "split parts do not reassemble the line"
    latin = [r["message"] for r in records if r["file"].endswith("latin1.log")]
    assert latin == ["caf\\xe9 au lait", "na\\xefve"], latin
    assert any(r["message"] == "binary header" for r in records)
    assert not any(r["file"].endswith(("secret.log", "dir.log", "pipe.log")) for r in records)

    m = agent.metrics()
    assert metric(m, "tron_agent_lines_split_total") >= 9
    assert metric(m, "tron_agent_invalid_utf8_lines_total") >= 2
    assert metric(m, "tron_agent_file_errors_total") >= (3 if wrapper else 2)
    log = agent.tail(50000)
    for name in (["secret.log"] if wrapper else []) + ["dir.log", "pipe.log"]:
        assert os.path.join(logs, name) in log, "%s not named in the log:\n%s" % (name, log)
    assert agent.running() and agent.health()[0] == 200
    assert agent.stop() == 0
    os.chmod(secret, stat.S_IRUSR | stat.S_IWUSR)
    shutil.rmtree(os.path.join(logs, "dir.log"))
