"""Bad configuration is refused at start with the file, the key's path and the problem."""
import json
import os
import sys
import subprocess

import tron

CASES = [
    ("tron-relay", 'listen = "127.0.0.1:1"\nplaintext = true\nlisten_backlog = 5\n[kafka]\nbrokers = "x"\ndefault_topic = "t"\n',
     "key `listen_backlog`: unknown field `listen_backlog`"),
    ("tron-relay", 'listen = "127.0.0.1:1"\n[kafka]\nbrokers = "x"\ndefault_topic = "t"\n',
     "key `tls`: missing: set [tls] cert and key, or plaintext = true"),
    ("tron-relay", 'listen = "nowhere"\nplaintext = true\n[kafka]\nbrokers = "x"\ndefault_topic = "t"\n',
     "key `listen`: invalid socket address syntax"),
    ("tron-agent", 'state_dir = "/tmp/x"\n[[sources]]\nname = "a"\ninclude = ["/x/*.log"]\ntag = "t"\nparser = "xml"\n[destinations.s3]\nurl = "file:///tmp/y"\n',
     "key `sources[0].parser`: unknown variant `xml`, expected `raw` or `json`"),
    ("tron-agent", 'state_dir = "/tmp/x"\n[[sources]]\nname = "a"\ninclude = ["/x/*.log"]\ntag = "t"\n[destinations.s3]\nurl = "file:///tmp/y"\n[destinations.s3.batch]\nmax_age = "soon"\n',
     "key `destinations.s3.batch.max_age`: invalid duration \"soon\""),
    ("tron-agent", 'state_dir = "/tmp/x"\n[[sources]]\nname = "a"\ninclude = ["/x/*.log"]\ntag = "t"\n[files]\nscan_intervall = "1s"\n[destinations.s3]\nurl = "file:///tmp/y"\n',
     "key `files.scan_intervall`: unknown field `scan_intervall`, expected one of"),
    ("tron-agent", 'state_dir = "/tmp/x"\n[[sources]]\nname = "a"\ninclude = ["/x/*.log"]\ntag = "t"\n[files]\nscan_intervall = "1s"\n[destinations.s3]\nurl = "file:///tmp/y"\n',
     "; did you mean `scan_interval`?"),
    ("tron-agent", 'state_dir = "/tmp/x"\n[[sources]]\nname = "a"\ninclude = ["/x/*.log"]\ntag = "t"\n[sources.multiline]\nstart = "^(unclosed"\n[destinations.s3]\nurl = "file:///tmp/y"\n',
     "key `sources[0].multiline.start`: invalid regex \"^(unclosed\": error: unclosed group"),
    ("tron-agent", 'state_dir = "/tmp/x"\n[[sources]]\nname = "a"\ninclude = ["/x/*.log", "/x/[*.log"]\ntag = "t"\n[destinations.s3]\nurl = "file:///tmp/y"\n',
     "key `sources[0].include[1]`: invalid glob \"/x/[*.log\""),
    ("tron-agent", 'state_dir = "/tmp/x"\n[[sources]]\nname = "a"\ninclude = ["/x/*.log"]\ntag = "t"\ntime_format = "weird"\n[destinations.s3]\nurl = "file:///tmp/y"\n',
     "key `sources[0].time_format`: unknown time format \"weird\""),
    ("tron-sink-secor", 'staging_dir = "/tmp/x"\n[kafka]\nbrokers = "x"\ngroup_id = "g"\ntopics = ["t"]\n[output]\nurl = "gs://b/p"\npath = "{topic}/%Y-%m-%d"\n',
     "key `output.path`: \"{topic}/%Y-%m-%d\": two hours map to the same directory"),
    ("tron-sink-secor", 'staging_dir = "/tmp/x"\n[kafka]\nbrokers = "x"\ngroup_id = "g"\ntopics = ["t"]\n[output]\nurl = "gs://b/p"\n[output.topic_paths]\nweb = "web/%Y/%m/%d/%H"\n',
     "key `output.topic_paths.web`: \"web\" is not one of kafka.topics"),
    ("tron-sink-secor", 'staging_dir = "/tmp/x"\nmetrics_listen = "127.0.0.1:0"\n[kafka]\nbrokers = "x"\ngroup_id = "g"\ntopics = ["t"]\n[output]\nurl = "gs://b/p"\nformat = "csv"\n[[output.columns]]\nname = "a"\nsorce = "a"\n',
     "did you mean `source`?"),
    ("tron-relay", 'listen = "127.0.0.1:1"\nplaintext = true\n[kafka]\nbrokers = "x"\ndefault_topic = "t"\n[security]\nshared_key_file = "/nonexistent/tron-key"\n',
     "key `security.shared_key_file`: cannot read /nonexistent/tron-key"),
    ("tron-relay", 'listen = "127.0.0.1:1"\nplaintext = true\n[kafka]\nbrokers = "x"\ndefault_topic = "t"\n[limits]\nmax_inflight_bytes = 33554432\nmax_inflight_bytes_per_connection = 67108864\n',
     "key `limits.max_inflight_bytes_per_connection`: must be more than 0 and at most limits.max_inflight_bytes"),
    ("tron-sink-secor", 'staging_dir = "/tmp/s"\n[kafka]\nbrokers = "x"\ngroup_id = "g"\ntopics = ["t"]\n[output]\nurl = "s3://nope"\n',
     "key `output.url`: must start with gs:// or file://"),
    ("tron-relay", 'listen = "127.0.0.1:1"\nplaintext = true\n[kafka]\nbrokers = "x"\ndefault_topic = "t"\n[security]\nshared_key = "k"\nreports_only_for_usernames = true\n',
     "key `security.reports_only_for_usernames`: needs security.users"),
]


def test_bad_configs_name_the_key_and_the_problem(tmp_path):
    for i, (binary, text, expected) in enumerate(CASES):
        path = tmp_path / ("c%d.toml" % i)
        path.write_text(text)
        out = subprocess.run([os.path.join(tron.BIN, binary), "--config", str(path), "--check-config"],
                             capture_output=True, text=True)
        assert out.returncode == 1, (binary, text, out.stdout)
        assert str(path) in out.stderr and expected in out.stderr, "%s\nexpected: %s\ngot: %s" % (text, expected, out.stderr)


def test_good_config_passes_check(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('listen = "127.0.0.1:24224"\nplaintext = true\n[kafka]\nbrokers = "127.0.0.1:9092"\ndefault_topic = "logs"\n')
    out = subprocess.run([os.path.join(tron.BIN, "tron-relay"), "--config", str(path), "--check-config"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "configuration is valid" in out.stdout


def test_example_configs_are_valid():
    for binary, name in [("tron-agent", "agent"), ("tron-relay", "relay"), ("tron-sink-secor", "sink-secor")]:
        path = os.path.join(tron.ROOT, "examples", name + ".toml")
        out = subprocess.run([os.path.join(tron.BIN, binary), "--config", path, "--check-config"],
                             capture_output=True, text=True)
        assert out.returncode == 0, "%s: %s" % (path, out.stderr)


def bq_argv(config, topic, hour, schema_file):
    out = subprocess.run([os.path.join(tron.BIN, "tron-sink-secor"), "--config", str(config), "bq-load-command",
                          "--topic", topic, "--hour", hour, "--schema-file", str(schema_file), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_bq_commands(tmp_path):
    path = os.path.join(tron.ROOT, "examples", "sink-secor.toml")
    sink = os.path.join(tron.BIN, "tron-sink-secor")
    schema = subprocess.run([sink, "--config", path, "bq-schema", "--topic", "logs"], capture_output=True, text=True)
    assert schema.returncode == 0, schema.stderr
    assert [c["name"] for c in json.loads(schema.stdout)] == ["time", "host", "message", "record"]
    unknown = subprocess.run([sink, "--config", path, "bq-schema", "--topic", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "kafka.topics" in unknown.stderr, (unknown.returncode, unknown.stderr)
    schema_file = tmp_path / "schema.json"
    argv = bq_argv(path, "logs", "2026-11-22T03", schema_file)
    assert argv == [
        "bq", "load", "--source_format=CSV", "--allow_quoted_newlines", "--field_delimiter=,",
        "--max_bad_records=0", "--replace", "--time_partitioning_type=HOUR", "--time_partitioning_field=time",
        "--hive_partitioning_mode=CUSTOM",
        "--hive_partitioning_source_uri_prefix=gs://my-warehouse/tron/logs/{dt:DATE}/{hr:INTEGER}",
        "logs.app_logs$2026112203", "gs://my-warehouse/tron/logs/dt=2026-11-22/hr=03/*.csv.gz", str(schema_file)]
    assert json.loads(schema_file.read_text()) == json.loads(schema.stdout)


def test_bq_command_for_a_topic_with_its_own_path(tmp_path):
    path = tmp_path / "sink.toml"
    path.write_text('staging_dir = "/tmp/x"\n[kafka]\nbrokers = "x"\ngroup_id = "g"\ntopics = ["web", "app"]\n'
                    '[output]\nurl = "gs://b/p"\nformat = "tsv"\n[output.topic_paths]\nweb = "web-archive/%Y/%m/%d/%H"\n')
    web = bq_argv(path, "web", "2026-11-22T03", tmp_path / "s.json")
    assert web[-2] == "gs://b/p/web-archive/2026/11/22/03/*.tsv.gz", web
    assert not [a for a in web if "hive_partitioning" in a], web
    assert "--field_delimiter=\t" in web, web
    app = bq_argv(path, "app", "2026-11-22T03", tmp_path / "s.json")
    assert app[-2] == "gs://b/p/app/dt=2026-11-22/hr=03/*.tsv.gz", app
    assert "--hive_partitioning_source_uri_prefix=gs://b/p/app/{dt:DATE}/{hr:INTEGER}" in app, app


def documented_block(doc, marker):
    text = open(os.path.join(tron.ROOT, "docs", doc)).read()
    after = text.split("<!-- tested: %s -->" % marker, 1)[1]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_documented_hourly_load_script_passes_bq_the_right_argv(tmp_path):
    """Runs docs/bigquery.md's script as written, with a `bq` first on PATH that records its argv
    and the schema file it is given (the script deletes it on exit)."""
    script = tmp_path / "hourly-load.sh"
    script.write_text(documented_block("bigquery.md", "hourly-load"))
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    record = tmp_path / "bq-call.json"
    (fakebin / "bq").write_text(
        "#!%s\nimport json, sys\nargv = sys.argv[1:]\n"
        "json.dump({'argv': argv, 'schema': json.load(open(argv[-1]))}, open(%r, 'w'))\n"
        % (sys.executable, str(record)))
    (fakebin / "bq").chmod(0o755)
    env = dict(os.environ, PATH="%s:%s:%s" % (fakebin, tron.BIN, os.environ["PATH"]),
               TRON_SINK_CONFIG=os.path.join(tron.ROOT, "examples", "sink-secor.toml"))
    out = subprocess.run(["bash", str(script), "2026-11-22T03"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    call = json.loads(record.read_text())
    argv = call["argv"]
    assert argv[0] == "load" and "--replace" in argv, argv
    assert argv[-3:-1] == ["logs.app_logs$2026112203", "gs://my-warehouse/tron/logs/dt=2026-11-22/hr=03/*.csv.gz"], argv
    assert "--hive_partitioning_source_uri_prefix=gs://my-warehouse/tron/logs/{dt:DATE}/{hr:INTEGER}" in argv, argv
    assert not [a for a in argv if "'" in a or '"' in a], "quote characters reached bq: %s" % argv
    assert [c["name"] for c in call["schema"]] == ["time", "host", "message", "record"]
