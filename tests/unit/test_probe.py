"""The reason a broker cannot be reached, found the way a connection would find it."""

from __future__ import annotations

import socket
import ssl
import threading

from forecaster.serve.probe import why_unreachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_port() -> None:
    assert "connection refused" in why_unreachable("127.0.0.1", _closed_port())


def test_unknown_host() -> None:
    # .invalid never resolves (RFC 2606).
    assert "does not resolve" in why_unreachable("broker.invalid", 1883)


def test_listener_that_is_not_a_broker() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert "TCP connects" in why_unreachable("127.0.0.1", port)


def test_tls_to_a_plain_listener_names_the_handshake() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer_in_plain_text() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 400 not TLS\r\n\r\n")

        t = threading.Thread(target=answer_in_plain_text, daemon=True)
        t.start()
        reason = why_unreachable("127.0.0.1", port, ssl.create_default_context(), timeout=5)
        t.join(timeout=5)
    assert reason.startswith("TLS handshake failed"), reason
