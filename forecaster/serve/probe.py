"""Why a broker cannot be reached: a name, a port, a certificate or the MQTT handshake.

paho's ``on_connect_fail`` carries no exception, so "cannot connect; retrying" is all a daemon
could say, and an operator cannot tell a typo in the host name from a stopped broker or an
expired certificate. :func:`why_unreachable` repeats the steps of a connection (resolve, TCP,
TLS) with the standard library and names the first one that fails, in one short phrase.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path


def tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None, insecure: bool
) -> ssl.SSLContext:
    """The client-side TLS context the daemon's MQTT links use, for the probe to repeat it."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def why_unreachable(
    host: str, port: int, tls: ssl.SSLContext | None = None, timeout: float = 3.0
) -> str:
    """The first step of connecting to ``host:port`` that fails, as a phrase for a log line."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"host name {host!r} does not resolve ({exc.strerror})"
    except (OSError, UnicodeError) as exc:
        return f"host name {host!r} does not resolve ({exc})"
    reasons: list[str] = []
    for family, kind, proto, _name, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                if tls is None:
                    return "TCP connects, but the broker did not complete the MQTT handshake"
                try:
                    with tls.wrap_socket(sock, server_hostname=host):
                        return "TLS works, but the broker did not complete the MQTT handshake"
                except ssl.SSLCertVerificationError as exc:
                    return f"TLS certificate not accepted: {exc.verify_message}"
                except (ssl.SSLError, OSError) as exc:
                    return f"TLS handshake failed: {exc}"
        except ConnectionRefusedError:
            reasons.append("connection refused (no broker listens on that port)")
        except TimeoutError:
            reasons.append(f"no answer within {timeout:g} s (a firewall, or the host is down)")
        except OSError as exc:
            reasons.append(exc.strerror or str(exc))
    return reasons[0] if reasons else f"{host!r} has no address"
