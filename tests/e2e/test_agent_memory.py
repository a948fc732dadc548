"""Memory stays bounded however many files are active. Every file with unsent lines has an open
batch holding a gzip encoder (404 KiB); with a long S3 max_age and 1,200 active files that alone
would be ~400 MiB. The agent charges it to max_buffer_bytes and sends the oldest batches early, so
peak RSS stays near the budget; after SIGTERM (which sends what is open) every line is archived."""
import gzip
import json
import os
import time

import tron

FILES = int(os.environ.get("TRON_MANY_FILES", "1200"))
ROUNDS = 3
LINES_PER_ROUND = 10


def archived(s3_dir):
    seen = set()
    for root, _, names in os.walk(s3_dir):
        for name in names:
            if name.endswith(".ndjson.gz"):
                with gzip.open(os.path.join(root, name), "rt") as f:
                    seen.update((r["file_no"], r["seq"]) for r in map(json.loads, f))
    return seen


def test_thousands_of_active_files_keep_memory_within_the_buffer_budget(workroot, certs, procs):
    tron.allow_open_files(FILES + 1024)
    work = os.path.join(workroot, "many-files")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    s3_dir = os.path.join(work, "s3")
    budget_mib = 24
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + s3_dir, None, certs)
    cfg["destinations"]["s3"]["batch"] = {"max_bytes": 4 << 20, "max_age": "60s", "max_inflight": 4,
                                          "max_buffer_bytes": budget_mib << 20}
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.append(agent)
    agent.start()
    for r in range(ROUNDS):
        for n in range(FILES):
            with open(os.path.join(logs, "f%05d.log" % n), "a") as f:
                for i in range(LINES_PER_ROUND):
                    seq = r * LINES_PER_ROUND + i
                    f.write(json.dumps({"file_no": n, "seq": seq, "msg": "m" * 120}) + "\n")
        time.sleep(3)
    expected = {(n, s) for n in range(FILES) for s in range(ROUNDS * LINES_PER_ROUND)}
    tron.wait_until("every file followed", lambda: agent.metric("tron_agent_files_tracked") == FILES,
                    timeout=60, interval=1, on_timeout=agent.metrics)
    tron.wait_until("every line read", lambda: (agent.metric("tron_agent_lines_read_total") or 0) >= len(expected),
                    timeout=120, interval=1, on_timeout=agent.metrics)
    rss = agent.peak_rss_mib()
    early = agent.metric("tron_agent_batches_sealed_early_total") or 0
    assert agent.stop() == 0  # SIGTERM sends every open batch
    got = archived(s3_dir)
    print("%d active files, S3 max_age 60s, max_buffer_bytes %d MiB: agent peak RSS %.1f MiB (open encoders "
          "unbounded would be %.0f MiB), %d batches sent early, %d of %d lines archived"
          % (FILES, budget_mib, rss, FILES * 404 / 1024, early, len(got & expected), len(expected)))
    assert got == expected
    assert early > 0
    assert rss < budget_mib + 64, "agent peak RSS %.1f MiB with a %d MiB budget" % (rss, budget_mib)
