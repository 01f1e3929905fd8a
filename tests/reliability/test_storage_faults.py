"""Storage faults against real S3 servers (moto over HTTP on 127.0.0.1): an outage in the middle
of a shard build or a checkpoint upload, transient 503s, wrong credentials, a missing bucket.

The outage is modelled by stopping the server and starting it again on the same port. moto's
threaded server keeps its buckets in this process, so the store comes back with what it held:
a network or endpoint outage, not data loss (data loss is covered by the corrupted-data tests).
"""
import hashlib
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from cldr_dist.config import load_config
from cldr_dist.data import storage

from tests.conftest import HELD_OUT, REPO, TINY, RestartableS3, free_port

SHARD_ARGS = [f"data.data_dir={TINY}", f"data.held_out_drugs={HELD_OUT}", "data.samples_per_shard=100"]


@pytest.fixture
def flaky_s3(monkeypatch):
    s3 = RestartableS3()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    try:
        yield s3
    finally:
        s3.stop()


def new_bucket(endpoint: str) -> str:
    import boto3
    name = f"cldr-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k[len(prefix):]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def without_timestamp(manifest: bytes) -> dict:
    m = json.loads(manifest)
    m.pop("created")
    return m


def test_outage_during_shard_build_then_rerun_is_complete(flaky_s3, monkeypatch, capsys):
    """The store goes away after 5 shard uploads: the CLI ends with one line and exit 2; no
    manifest is visible (the old one was dropped first); once the store is back, rerunning the
    same command produces exactly what an undisturbed build produces."""
    from cldr_dist import cli
    from cldr_dist.data.shards import MANIFEST, build_shards
    bucket = new_bucket(flaky_s3.endpoint)
    cfg = load_config(None, SHARD_ARGS)
    quiet = dict(progress=False, log=lambda *_: None)
    build_shards(cfg, out=f"s3://{bucket}/reference", **quiet)
    build_shards(cfg, out=f"s3://{bucket}/shards", **quiet)  # an older complete build, about to be replaced
    reference = objects(flaky_s3.endpoint, bucket, "reference/")

    real_put = storage.put_file
    uploads = {"shards": 0, "manifest_seen": []}

    def put_then_maybe_fail(local, url):
        if url.endswith(".tar.gz"):
            uploads["shards"] += 1
            if uploads["shards"] == 6:
                flaky_s3.stop()  # the 6th shard upload meets a dead endpoint
        if flaky_s3.server:  # no partial manifest is ever visible while the build is incomplete
            uploads["manifest_seen"].append(storage.exists(f"s3://{bucket}/shards/{MANIFEST}"))
        return real_put(local, url)

    monkeypatch.setattr(storage, "put_file", put_then_maybe_fail)
    args = ["shards", "--out", f"s3://{bucket}/shards", "--quiet", *SHARD_ARGS]
    t0 = time.time()
    assert cli.main(args) == 2  # a user-facing error, not an exception escaping the CLI
    failed_after = time.time() - t0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"cldr shards: error: s3://{bucket}/shards/") and "Could not connect" in err
    assert "testing" not in err  # the access key / secret of this server

    flaky_s3.start()  # same port, same contents
    stored = objects(flaky_s3.endpoint, bucket, "shards/")
    assert MANIFEST not in stored and any(k.endswith(".tar.gz") for k in stored)
    seen = uploads["manifest_seen"]  # the first upload is the write probe, before the old manifest goes
    assert seen[0] and not any(seen[1:])

    uploads["manifest_seen"].clear()
    assert cli.main(args) == 0
    assert len(uploads["manifest_seen"]) > 10 and not any(uploads["manifest_seen"])
    stored = objects(flaky_s3.endpoint, bucket, "shards/")
    assert set(stored) == set(reference)
    assert without_timestamp(stored[MANIFEST]) == without_timestamp(reference[MANIFEST])
    manifest = json.loads(stored[MANIFEST])
    for split in manifest["splits"].values():
        for part in split.values():
            for shard in part["shards"]:
                assert hashlib.sha256(stored[shard["url"]]).hexdigest() == shard["sha256"]
    print(f"\noutage detected after {failed_after:.1f}s (retries with backoff included)")


# ----------------------------------------------------------------------------- transient errors

class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that answers the first `fail`
    requests with 503 SlowDown (S3's throttling reply), then forwards everything."""

    def __init__(self, upstream_port: int, fail: int):
        self.fail, self.seen, self.times = fail, 0, []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # botocore streams uploads
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _any(self):
                body = self._body()
                proxy.seen += 1
                proxy.times.append(time.time())
                if proxy.seen <= proxy.fail:
                    reply = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                             b'<Message>Please reduce your request rate.</Message></Error>')
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                # a HEAD reply has no body but announces the object's size
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_to(s3_server, monkeypatch):
    proxies = []

    def make(fail: int) -> FlakyProxy:
        p = FlakyProxy(int(s3_server.rsplit(":", 1)[1]), fail)
        proxies.append(p)
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        return p
    try:
        yield make
    finally:
        for p in proxies:
            p.close()


def test_transient_503s_are_retried_with_backoff(proxy_to, s3_bucket):
    proxy = proxy_to(fail=2)
    url = f"{s3_bucket}/transient/blob"
    storage.write_bytes(url, b"payload")
    assert proxy.seen == 3  # two 503s, then the PUT that went through
    assert storage.read_bytes(url) == b"payload"
    gaps = [b - a for a, b in zip(proxy.times, proxy.times[1:3])]
    assert sum(gaps) > 0.05, gaps  # waited between attempts instead of hammering the server


@pytest.mark.slow  # the full backoff schedule, twice: ~30 s
def test_persistent_503s_give_up_with_one_line(proxy_to, s3_bucket):
    proxy = proxy_to(fail=10**6)
    url = f"{s3_bucket}/transient/never"
    t0 = time.time()
    with pytest.raises(storage.StorageError) as e:
        storage.write_bytes(url, b"payload")
    assert str(e.value).startswith(f"{url}: ") and "\n" not in str(e.value)
    # botocore's attempts, in at most S3FS_ROUNDS rounds: never the 25+ of nested retries
    assert storage.S3_MAX_ATTEMPTS <= proxy.seen <= storage.S3_MAX_ATTEMPTS * storage.S3FS_ROUNDS, proxy.seen
    assert time.time() - t0 < 60


# ----------------------------------------------------------------------------- user mistakes

@pytest.fixture
def auth_s3():
    """A separate moto server process that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/moto-api/")
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cli(*args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cldr_dist.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def finished(proc: subprocess.Popen) -> subprocess.Popen:
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    return proc


def test_wrong_credentials_and_missing_bucket_are_one_line(auth_s3, s3_server):
    """Against live servers (test_hostile_input covers an unreachable one): credentials the
    server rejects, and a bucket that does not exist, each end in one line naming the URL."""
    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY99"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY00000000", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": auth_s3, "OMP_NUM_THREADS": "1"}
    wrong = cli("shards", "--out", "s3://some-bucket/shards", "--quiet", *SHARD_ARGS, env=env)
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server, "OMP_NUM_THREADS": "1"}
    missing = cli("shards", "--out", "s3://no-such-bucket-4242/shards", "--quiet", *SHARD_ARGS, env=env)
    wrong, missing = finished(wrong), finished(missing)  # the two CLIs start up side by side
    for proc, url in ((wrong, "s3://some-bucket/shards"), (missing, "s3://no-such-bucket-4242/shards")):
        err = proc.stderr_text.strip().splitlines()
        assert proc.returncode == 2, proc.stderr_text
        assert len(err) == 1 and err[0].startswith(f"cldr shards: error: cannot write to {url}: "), proc.stderr_text
    assert "credentials" in wrong.stderr_text.lower() or "access key" in wrong.stderr_text.lower(), wrong.stderr_text
    assert "bucket does not exist" in missing.stderr_text
    out = wrong.stdout_text + wrong.stderr_text
    assert secret not in out and secret[:10] not in out
