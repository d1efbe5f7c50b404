#!/usr/bin/env python3
"""Readiness probe for the local CQL store: a real query over the CQL native protocol (v4).

Usage: cql_ping.py [host] [port]. Prints the server's release_version and exits 0 when
`SELECT release_version FROM system.local` answers; exits 1 with a short reason otherwise.
Dependency-free on purpose: it runs before anything else of the project is installed.
"""
import socket
import struct
import sys

OP_ERROR, OP_STARTUP, OP_READY, OP_QUERY, OP_RESULT = 0x00, 0x01, 0x02, 0x07, 0x08


def frame(stream, opcode, body):
    return struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body


def string(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def read_frame(sock):
    _version, _flags, _stream, opcode, length = struct.unpack(">BBhBi", recv_exact(sock, 9))
    return opcode, recv_exact(sock, length)


def error_text(body):
    code = struct.unpack(">i", body[:4])[0]
    n = struct.unpack(">H", body[4:6])[0]
    return f"server error 0x{code:04x}: {body[6:6 + n].decode(errors='replace')}"


def main():
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 9042
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(frame(1, OP_STARTUP, struct.pack(">H", 1) + string("CQL_VERSION") + string("3.0.0")))
        op, body = read_frame(s)
        if op != OP_READY:
            raise RuntimeError(error_text(body) if op == OP_ERROR else f"unexpected opcode {op} to STARTUP")
        query = b"SELECT release_version FROM system.local"
        # [long string query][short consistency ONE=0x0001][byte flags]
        s.sendall(frame(2, OP_QUERY, struct.pack(">i", len(query)) + query + struct.pack(">HB", 0x0001, 0)))
        op, body = read_frame(s)
        if op != OP_RESULT:
            raise RuntimeError(error_text(body) if op == OP_ERROR else f"unexpected opcode {op} to QUERY")
        kind = struct.unpack(">i", body[:4])[0]
        if kind != 2:
            raise RuntimeError(f"result kind {kind}, expected rows")
        pos = 4
        flags, ncols = struct.unpack(">ii", body[pos:pos + 8])
        pos += 8
        if flags & 0x0002:  # has_more_pages: skip paging state
            n = struct.unpack(">i", body[pos:pos + 4])[0]
            pos += 4 + max(n, 0)
        global_spec = flags & 0x0001
        if global_spec:
            for _ in range(2):
                n = struct.unpack(">H", body[pos:pos + 2])[0]
                pos += 2 + n
        for _ in range(ncols):
            if not global_spec:
                for _ in range(2):
                    n = struct.unpack(">H", body[pos:pos + 2])[0]
                    pos += 2 + n
            n = struct.unpack(">H", body[pos:pos + 2])[0]
            pos += 2 + n
            pos += 2  # type id (varchar: no extra option bytes)
        rows = struct.unpack(">i", body[pos:pos + 4])[0]
        pos += 4
        if rows < 1:
            raise RuntimeError("system.local returned no row")
        n = struct.unpack(">i", body[pos:pos + 4])[0]
        print(body[pos + 4:pos + 4 + n].decode())


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - any failure means "not ready"
        print(f"cql not ready: {e}", file=sys.stderr)
        sys.exit(1)
