#!/usr/bin/env python3
"""A fault-injecting reverse proxy in front of an S3 server (moto) for tests/upload.rs.

Forwards every request unchanged (the client signs the proxy's Host, which the server sees
too) and, for UploadPart requests (PUT with partNumber and uploadId), can:
  --delay SECONDS      wait before forwarding each one (throttles an upload so that a test can
                       kill imgctl mid-way);
  --fail-after N       answer 500 InternalError to every UploadPart after the first N;
  --complete-delay S   wait before forwarding CompleteMultipartUpload (POST with uploadId).
Every UploadPart's x-amz-checksum-sha256 header is checked against its body (moto itself does
not check it): a wrong one is answered 400 BadDigest, a correct one counted.
GET /__proxy_stats answers {"upload_parts": [part numbers forwarded, in order],
"failed_parts": count, "checksummed": UploadParts with a correct SHA-256 header}; GET /__proxy_config?delay=S&fail_after=N&complete_delay=S changes the options and
resets the counts (a resumed upload must reach the same endpoint: it is part of its identity). The listening port is printed on stdout's first line.
"""

import argparse
import base64
import hashlib
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-connection"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-after", type=int, default=-1)
    parser.add_argument("--complete-delay", type=float, default=0.0)
    args = parser.parse_args()
    upstream = urllib.parse.urlsplit(args.upstream)
    lock = threading.Lock()
    stats = {"upload_parts": [], "failed_parts": 0, "checksummed": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def reply(self, status, headers, body):
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            if self.command == "HEAD":
                # No body; the length is the object's, as the server said.
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length)
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def handle_any(self):
            body = self.body()
            if self.path == "/__proxy_stats":
                with lock:
                    text = json.dumps(stats).encode()
                return self.reply(200, [("Content-Type", "application/json")], text)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if self.path.startswith("/__proxy_config"):
                with lock:
                    args.delay = float(query.get("delay", ["0"])[0])
                    args.fail_after = int(query.get("fail_after", ["-1"])[0])
                    args.complete_delay = float(query.get("complete_delay", ["0"])[0])
                    stats["upload_parts"].clear()
                    stats["failed_parts"] = 0
                    stats["checksummed"] = 0
                return self.reply(200, [], b"")
            if self.command == "PUT" and "partNumber" in query and "uploadId" in query:
                part = int(query["partNumber"][0])
                checksum = self.headers.get("x-amz-checksum-sha256")
                if checksum is not None:
                    if checksum != base64.b64encode(hashlib.sha256(body).digest()).decode():
                        error = b"<Error><Code>BadDigest</Code></Error>"
                        return self.reply(400, [("Content-Type", "application/xml")], error)
                    with lock:
                        stats["checksummed"] += 1
                with lock:
                    fail = 0 <= args.fail_after <= len(stats["upload_parts"])
                    if fail:
                        stats["failed_parts"] += 1
                    else:
                        stats["upload_parts"].append(part)
                if fail:
                    error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError'
                             b'</Code><Message>injected failure</Message></Error>')
                    return self.reply(500, [("Content-Type", "application/xml")], error)
                time.sleep(args.delay)
            if self.command == "POST" and "uploadId" in query:
                time.sleep(args.complete_delay)
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            connection.close()
            self.reply(response.status, response.getheaders(), data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
