"""QemuProcess._connect_qmp against a socket that garbles its first greeting (seen once in CI while a
snapshot restored: "'Greeting' object requires 'QMP' member"): the first client fails, a fresh one must
get through, because QEMU's QMP takes a new client after the first hangs up."""

import json
import socket
import threading
from pathlib import Path

from testbench.emulator.qemu import QemuProcess, Sockets

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


def serve(path: Path, replies: list[bytes]) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(2)

    def run() -> None:
        for first in replies:
            conn, _ = server.accept()
            with conn:
                conn.sendall(first)
                if b'"QMP"' not in first:
                    continue
                request = b""
                while True:  # qmp_capabilities: the client sends bare JSON, no newline
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                    try:
                        asked = json.loads(request)
                        break
                    except ValueError:
                        continue
                reply = {"return": {}, "id": asked.get("id")}
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
                conn.recv(1)  # until the client hangs up
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_garbled_greeting_then_a_good_one(tmp_path):
    sock = tmp_path / "qmp.sock"
    thread = serve(sock, [b'{"return": {}}\r\n', json.dumps(GREETING).encode() + b"\r\n"])
    qemu = object.__new__(QemuProcess)
    qemu.qmp = None
    qemu.sockets = Sockets(sock, tmp_path / "console.sock", tmp_path / "gdb.sock")
    first = qemu._connect_qmp()
    assert first is not None and "Greeting" in str(first)
    assert qemu._connect_qmp() is None
    assert qemu.qmp is not None
    qemu.qmp.close()
    thread.join(timeout=5)
