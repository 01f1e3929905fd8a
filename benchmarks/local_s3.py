"""A local S3 server for benchmarks: moto in server mode on 127.0.0.1."""
from __future__ import annotations

import os
import socket


def start_s3() -> tuple[object, str]:
    """Starts moto on a free port and points AWS_* at it (set before Ray starts, so workers
    inherit them). Returns (server, endpoint); the caller stops the server."""
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    return server, endpoint
