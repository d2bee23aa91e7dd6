#!/usr/bin/env python3
"""Talks to imgcryptd with the reference Varlink implementation (PyPI `varlink`), as any
third-party client would, and prints what it got as one JSON object for tests/varlink_python.rs.

usage: varlink_client.py SOCKET SOURCE IMAGE KEY

The library parses the served interface description (varlink.Interface) and builds a proxy from
it; calls go through that proxy, and its replies are filtered by the parsed types. It cannot pass
descriptors, so the connection it uses is wrapped: the next message sent carries the armed
descriptors as SCM_RIGHTS on its first byte (socket.send_fds), which is how io.imgcrypt takes
them (docs/protocol.md, "File descriptors"). Every raw reply is kept too, so the test can check
that the proxy's view (fields the interface does not declare are dropped) is the whole reply.
"""

import json
import os
import socket
import sys

import varlink


class PassingSocket:
    """The proxy's socket: sends `fds` with the first byte of the next message, keeps replies."""

    def __init__(self, sock):
        self.sock = sock
        self.fds = []
        self.received = b""

    def sendall(self, data):
        if self.fds:
            sent = socket.send_fds(self.sock, [data], self.fds)
            self.fds = []
            data = data[sent:]
        self.sock.sendall(data)

    def recv(self, size):
        data = self.sock.recv(size)
        self.received += data
        return data

    def raw_replies(self):
        """The replies received since the last call, parsed, and forgets them."""
        messages = [json.loads(m) for m in self.received.split(b"\0") if m]
        self.received = b""
        return messages

    def shutdown(self, how):
        self.sock.shutdown(how)

    def close(self):
        self.sock.close()


def main():
    socket_path, source, image, key = sys.argv[1:5]
    client = varlink.Client(address="unix:" + socket_path)
    out = {}

    with client.open("org.varlink.service") as service:
        out["info"] = service.GetInfo()
        description = service.GetInterfaceDescription("io.imgcrypt")["description"]
        service_description = service.GetInterfaceDescription("org.varlink.service")["description"]
    interface = varlink.Interface(description)
    out["members"] = sorted(interface.members)
    out["service_members"] = sorted(varlink.Interface(service_description).members)

    connection = PassingSocket(client.open_connection())
    # open() fetches the description again on this connection and builds the proxy from it.
    imgcrypt = client.open("io.imgcrypt", connection=connection)
    connection.raw_replies()

    files = []

    def passing(*paths):
        fds = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in paths]
        files.extend(fds)
        connection.fds = fds

    passing(source)
    out["inspect_source"] = imgcrypt.Inspect(image=0)
    out["inspect_source_raw"] = connection.raw_replies()

    passing(image, key)
    out["inspect_image"] = imgcrypt.Inspect(image=0, keys=[{"fd": 1, "name": "test_key"}])
    out["inspect_image_raw"] = connection.raw_replies()

    # No descriptor passed: the daemon's error arrives through the proxy as a VarlinkError.
    try:
        imgcrypt.Inspect(image=0)
        out["error"] = None
    except varlink.VarlinkError as error:
        out["error"] = {"name": error.error(), "parameters": error.parameters()}
    connection.raw_replies()

    # The connection is still usable after the error.
    passing(source)
    out["inspect_again"] = imgcrypt.Inspect(image=0)
    connection.raw_replies()

    # The job registry through the proxy: every job above is listed, and an unknown id is
    # the interface's NoSuchJob.
    out["jobs"] = imgcrypt.Jobs()
    out["jobs_raw"] = connection.raw_replies()
    try:
        imgcrypt.Status(id=999999)
        out["no_such_job"] = None
    except varlink.VarlinkError as error:
        out["no_such_job"] = {"name": error.error(), "parameters": error.parameters()}

    imgcrypt.close()
    for fd in files:
        os.close(fd)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
