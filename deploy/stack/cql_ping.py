#!/usr/bin/env python3
"""Dependency-free Cassandra readiness probe speaking CQL native protocol v4.

Connects (over TLS with --tls-ca), sends STARTUP (CQL_VERSION 3.0.0), answers a password
challenge with --user/--password-file (SASL PLAIN), then runs
`SELECT release_version FROM system.local` at consistency ONE, parses the ROWS
result and prints the release_version. Exit 0 on success; non-zero with a short
message on stderr otherwise (1 = connection/protocol/server error, 2 = usage).

With --ensure-role, a login refused as --user is retried once as the default superuser
(cassandra/cassandra, which a fresh node with PasswordAuthenticator has) to create the role with
that password, then the probe runs as --user again. The development stack uses this to make its
`carhook` role on first start.

Usage: cql_ping.py [host] [port] [--timeout SECONDS] [--tls-ca PEM] [--user U --password-file F]
       [--ensure-role]                                   (defaults: 127.0.0.1 9042, 5 s)
"""

import argparse
import socket
import struct
import sys

PROTOCOL_VERSION = 0x04
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE = 0x00, 0x01, 0x02, 0x03
OP_QUERY, OP_RESULT = 0x07, 0x08
OP_AUTH_RESPONSE, OP_AUTH_SUCCESS = 0x0F, 0x10
BAD_CREDENTIALS = 0x0100
RESULT_ROWS = 0x0002
CONSISTENCY_ONE = 0x0001
QUERY = "SELECT release_version FROM system.local"


class ProbeError(Exception):
    pass


class BadCredentials(ProbeError):
    pass


class Reader:
    """Cursor over a frame body with the [int]/[short]/[string]/... primitives of the spec."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProbeError("truncated response body")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def short(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def string(self) -> str:
        return self.take(self.short()).decode("utf-8", "replace")

    def bytes(self):
        n = self.int()
        return None if n < 0 else self.take(n)

    def option(self) -> None:
        """Skip a column type [option], recursing into collection/UDT/tuple parameters."""
        type_id = self.short()
        if type_id == 0x0000:  # custom: class name
            self.string()
        elif type_id in (0x0020, 0x0022):  # list, set
            self.option()
        elif type_id == 0x0021:  # map
            self.option()
            self.option()
        elif type_id == 0x0030:  # UDT
            self.string()
            self.string()
            for _ in range(self.short()):
                self.string()
                self.option()
        elif type_id == 0x0031:  # tuple
            for _ in range(self.short()):
                self.option()


def frame(opcode: int, body: bytes, stream: int) -> bytes:
    return struct.pack(">BBhBi", PROTOCOL_VERSION, 0, stream, opcode, len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed by server")
        buf.extend(chunk)
    return bytes(buf)


def read_frame(sock: socket.socket):
    version, flags, _stream, opcode, length = struct.unpack(">BBhBi", recv_exact(sock, 9))
    if version & 0x7F != PROTOCOL_VERSION or not version & 0x80:
        raise ProbeError(f"unexpected response protocol version byte 0x{version:02x}")
    body = recv_exact(sock, length)
    if flags & 0x01:
        raise ProbeError("server sent a compressed frame although none was negotiated")
    reader = Reader(body)
    if flags & 0x02:  # tracing id
        reader.take(16)
    if flags & 0x08:  # custom payload
        for _ in range(reader.short()):
            reader.string()
            reader.bytes()
    if flags & 0x04:  # warnings
        for _ in range(reader.short()):
            reader.string()
    return opcode, reader


def raise_if_error(opcode: int, reader: Reader, expected: str) -> None:
    if opcode == OP_ERROR:
        code = reader.int()
        if code == BAD_CREDENTIALS:
            raise BadCredentials(f"login refused: {reader.string()}")
        raise ProbeError(f"server error 0x{code:04x}: {reader.string()}")
    if opcode == OP_AUTHENTICATE:
        raise ProbeError(f"server requires authentication ({reader.string()})")
    raise ProbeError(f"expected {expected}, got opcode 0x{opcode:02x}")


def startup_body() -> bytes:
    entries = {"CQL_VERSION": "3.0.0"}
    out = struct.pack(">H", len(entries))
    for key, value in entries.items():
        for s in (key, value):
            raw = s.encode()
            out += struct.pack(">H", len(raw)) + raw
    return out


def query_body(cql: str) -> bytes:
    raw = cql.encode()
    # [long string] query, [consistency], [byte] flags (no values, no paging options)
    return struct.pack(">i", len(raw)) + raw + struct.pack(">HB", CONSISTENCY_ONE, 0)


def parse_rows(reader: Reader):
    kind = reader.int()
    if kind != RESULT_ROWS:
        raise ProbeError(f"expected a ROWS result, got result kind {kind}")
    flags, column_count = reader.int(), reader.int()
    if flags & 0x0002:  # has_more_pages: paging state
        reader.bytes()
    names = []
    if not flags & 0x0004:  # metadata present
        global_spec = bool(flags & 0x0001)
        if global_spec:
            reader.string()
            reader.string()
        for _ in range(column_count):
            if not global_spec:
                reader.string()
                reader.string()
            names.append(reader.string())
            reader.option()
    rows = []
    for _ in range(reader.int()):
        rows.append([reader.bytes() for _ in range(column_count)])
    return names, rows


def connect(host: str, port: int, timeout: float, tls_ca, credentials):
    """An open session: TLS when asked, STARTUP, and the password login when the server wants one."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    if tls_ca:
        import ssl

        context = ssl.create_default_context(cafile=tls_ca)
        sock = context.wrap_socket(sock, server_hostname=host)
    sock.sendall(frame(OP_STARTUP, startup_body(), 0))
    opcode, reader = read_frame(sock)
    if opcode == OP_AUTHENTICATE:
        if not credentials:
            raise ProbeError(f"server requires authentication ({reader.string()}); pass --user and --password-file")
        user, password = credentials
        token = b"\0" + user.encode() + b"\0" + password.encode()
        sock.sendall(frame(OP_AUTH_RESPONSE, struct.pack(">i", len(token)) + token, 0))
        opcode, reader = read_frame(sock)
        if opcode != OP_AUTH_SUCCESS:
            sock.close()
            raise_if_error(opcode, reader, "AUTH_SUCCESS")
    elif opcode != OP_READY:
        sock.close()
        raise_if_error(opcode, reader, "READY")
    return sock


def run(sock, cql: str, stream: int):
    sock.sendall(frame(OP_QUERY, query_body(cql), stream))
    opcode, reader = read_frame(sock)
    if opcode != OP_RESULT:
        raise_if_error(opcode, reader, "RESULT")
    return reader


def cql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def ensure_role(host, port, timeout, tls_ca, credentials) -> None:
    """Creates (or re-passwords) the role as the default superuser."""
    user, password = credentials
    try:
        sock = connect(host, port, timeout, tls_ca, ("cassandra", "cassandra"))
    except BadCredentials as exc:
        raise ProbeError(f"role {user} is refused and the default superuser cannot log in to create it ({exc})")
    with sock:
        run(sock, f'CREATE ROLE IF NOT EXISTS "{user}" WITH PASSWORD = {cql_string(password)} AND LOGIN = true AND SUPERUSER = true', 1)
        run(sock, f'ALTER ROLE "{user}" WITH PASSWORD = {cql_string(password)}', 2)


def ping(host: str, port: int, timeout: float, tls_ca=None, credentials=None, ensure=False) -> str:
    try:
        sock = connect(host, port, timeout, tls_ca, credentials)
    except BadCredentials:
        if not (ensure and credentials):
            raise
        ensure_role(host, port, timeout, tls_ca, credentials)
        sock = connect(host, port, timeout, tls_ca, credentials)
    with sock:
        names, rows = parse_rows(run(sock, QUERY, 1))
        if not rows:
            raise ProbeError("system.local returned no rows")
        idx = names.index("release_version") if "release_version" in names else 0
        value = rows[0][idx]
        if value is None:
            raise ProbeError("release_version is null")
        return value.decode("utf-8", "replace")


def main() -> int:
    parser = argparse.ArgumentParser(description="CQL readiness probe (native protocol v4)")
    parser.add_argument("host", nargs="?", default="127.0.0.1")
    parser.add_argument("port", nargs="?", type=int, default=9042)
    parser.add_argument("--timeout", type=float, default=5.0, help="socket timeout in seconds")
    parser.add_argument("--tls-ca", help="PEM CA bundle: connect over TLS and verify the node against it")
    parser.add_argument("--user", help="role to log in as (with --password-file)")
    parser.add_argument("--password-file", help="file holding the role's password")
    parser.add_argument("--ensure-role", action="store_true", help="create the role if its login is refused")
    args = parser.parse_args()
    credentials = None
    if args.user:
        if not args.password_file:
            parser.error("--user needs --password-file")
        try:
            with open(args.password_file, encoding="utf-8") as f:
                credentials = (args.user, f.read().strip())
        except OSError as exc:
            print(f"cql_ping: --password-file: {exc}", file=sys.stderr)
            return 2
    try:
        print(ping(args.host, args.port, args.timeout, args.tls_ca, credentials, args.ensure_role))
        return 0
    except (OSError, ProbeError) as exc:
        print(f"cql_ping: {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
