"""The sink authenticates to GCS with `output.credentials_file` even when `output.endpoint` is set
(an endpoint no longer means "no auth"): a service-account key file whose `token_uri` is a local
OAuth token endpoint, so the test sees the signed JWT the sink exchanges for a token. fake-gcs-server
accepts the bearer token it then sends. Google's own token service is not reachable here; this
checks our wiring of the key file, not Google's."""
import base64
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fluent import sender

import tron


class TokenEndpoint:
    """Answers OAuth 2.0 JWT-bearer grants (RFC 7523) with a fixed token; keeps the assertions."""

    def __init__(self):
        self.assertions = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                outer.assertions.append(form.get("assertion", [""])[0])
                body = json.dumps({"access_token": "tron-test-token", "expires_in": 3600,
                                   "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/token" % self.server.server_address[1]

    def stop(self):
        self.server.shutdown()


def service_account_key(path, token_uri):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    with open(path, "w") as f:
        json.dump({"type": "service_account", "project_id": "tron-test", "private_key_id": "k1",
                   "private_key": pem, "client_email": "tron-sink@tron-test.iam.gserviceaccount.com",
                   "client_id": "1", "token_uri": token_uri}, f)


def jwt_claims(assertion):
    payload = assertion.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_the_sink_uses_its_credentials_file_with_an_explicit_endpoint(services, certs, workroot, procs):
    work = os.path.join(workroot, "gcs-credentials")
    tokens = TokenEndpoint()
    try:
        relay, sink, host, port = tron.relay_to_gcs(services, certs, work, procs, "gcs-auth", "gcs-auth", 1,
                                                    plaintext=True)
        # Restart the sink with a key file instead of anonymous access.
        sink.kill()
        key = os.path.join(work, "sink-key.json")
        service_account_key(key, tokens.url)
        del sink.config["output"]["anonymous"]
        sink.config["output"]["credentials_file"] = key
        sink = tron.Proc("sink-keyed", "tron-sink-secor", sink.config, work)
        procs.append(sink)
        sink.start()

        log = sender.FluentSender("auth", host=host, port=port)
        for i in range(20):
            assert log.emit("evt", {"seq": i, "msg": "m"}), log.last_error
        log.close()

        def uploaded():
            return [o for o in services.gcs_list("gcs-auth", "w/") if not o["name"].rsplit("/", 1)[1].startswith("_")]

        tron.wait_until("an object uploaded with the key file's token", uploaded, timeout=90,
                        on_timeout=lambda: sink.tail())
        assert tokens.assertions, "the sink never asked the key file's token_uri for a token"
        claims = jwt_claims(tokens.assertions[0])
        assert claims["iss"] == "tron-sink@tron-test.iam.gserviceaccount.com", claims
        assert claims["aud"] == tokens.url, claims
        assert "devstorage" in claims.get("scope", ""), claims
    finally:
        tokens.stop()


def test_a_missing_credentials_file_is_a_config_error_naming_the_key(workroot):
    import subprocess
    work = os.path.join(workroot, "gcs-credentials-missing")
    os.makedirs(work)
    cfg = tron.sink_config(work, "127.0.0.1:9", "gs://b/w")
    cfg["output"]["credentials_file"] = "/nonexistent/key.json"
    path = os.path.join(work, "sink.toml")
    with open(path, "w") as f:
        f.write(tron.to_toml(cfg))
    out = subprocess.run([os.path.join(tron.BIN, "tron-sink-secor"), "--config", path, "--check-config"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "key `output.credentials_file`" in out.stderr and "/nonexistent/key.json" in out.stderr, out.stderr
