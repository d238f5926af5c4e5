"""Run one relay-only WebRTC call in headless Chromium through a real turnd; print a JSON verdict.

Meant to run inside a network namespace made by tests/browser/test_webrtc_call.py:

    ip netns exec NAME python tests/browser/run_call.py --transport udp|tcp|tls --workdir DIR

Chromium gathers no ICE candidates when only the loopback interface exists, so the namespace
has one veth interface up as well; turnd, its relay ports, the page server and the browser all
stay on 127.0.0.1 inside it.  The verdict is the raw facts (getStats() from both peers, the
data-channel echoes, turnd's usage records); the pytest test judges them.  Exit status: 0 when
a verdict was printed, whatever it says; 2 when setting up failed (still with a JSON line).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    # Run as a script, so the repository root is not on the path by itself.
    sys.path.insert(0, str(REPO))

from tests.integration.server import RunningServer, start_server  # noqa: E402
from turnserver.credentials import mint_credentials  # noqa: E402

PAGE = Path(__file__).with_name("call.html")
CHROMIUM = "/usr/bin/chromium"
# Flags from /work/shared/INTEROP.md; Playwright adds --headless itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    # turnd makes a self-signed certificate when none is configured; Chromium checks
    # TURN-over-TLS certificates and would fail ICE with error 701 otherwise.
    "--ignore-certificate-errors",
]
USER = "browser"
TTL_S = 600
USAGE_WAIT_S = 5.0
# Browser start and page load; the call itself has its own bound (--call-timeout).
BROWSER_STEP_TIMEOUT_S = 10.0
MAX_CONSOLE_LINES = 50


def ice_url(transport: str, port: int) -> str:
    # RFC 7065 §3.1: "turns" with transport=tcp is TURN over TLS.
    if transport == "udp":
        return f"turn:127.0.0.1:{port}?transport=udp"
    if transport == "tcp":
        return f"turn:127.0.0.1:{port}?transport=tcp"
    if transport == "tls":
        return f"turns:127.0.0.1:{port}?transport=tcp"
    raise ValueError(f"unknown transport {transport!r}")


def usage_records(log_text: str) -> list[dict[str, Any]]:
    """The "turnd.usage" records from a JSON-format turnd log."""
    records = []
    for line in log_text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "turnd.usage" and isinstance(entry.get("usage"), dict):
            records.append(entry["usage"])
    return records


class PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves the one page and nothing else."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        if self.path.split("?", 1)[0] not in ("/", "/call.html"):
            self.send_error(404)
            return
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib signature
        pass  # stdout carries the verdict only


def start_page_server() -> http.server.ThreadingHTTPServer:
    # http://127.0.0.1 is a secure context, which getUserMedia requires.
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    httpd.daemon_threads = True
    threading.Thread(target=functools.partial(httpd.serve_forever, poll_interval=0.1), daemon=True).start()
    return httpd


def run_browser(page_url: str, ice_servers: list[dict[str, Any]], workdir: Path, messages: int,
                call_timeout_s: float) -> tuple[dict[str, Any], list[str]]:
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    timeout_ms = int(BROWSER_STEP_TIMEOUT_S * 1000)
    with sync_playwright() as pw:
        # A fresh profile directory every run: no state leaks between transports.
        context = pw.chromium.launch_persistent_context(
            str(workdir / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=timeout_ms,
        )
        try:
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}")
                    if len(console) < MAX_CONSOLE_LINES else None)
            page.goto(page_url, timeout=timeout_ms)
            result = page.evaluate(
                "cfg => window.runCall(cfg)",
                {"iceServers": ice_servers, "messages": messages, "timeoutMs": int(call_timeout_s * 1000)},
            )
        finally:
            context.close()
    return result, console


def wait_for_usage(server: RunningServer, user_suffix: str, count: int, timeout_s: float) -> None:
    """Give the Refresh(lifetime 0) that Chromium sends on close time to reach the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = [r for r in usage_records(server.log_text()) if str(r.get("user", "")).endswith(user_suffix)]
        if len(records) >= count:
            return
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--transport", choices=("udp", "tcp", "tls"), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--call-timeout", type=float, default=15.0,
                        help="seconds allowed for the call in the page, from offer to audio")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    verdict: dict[str, Any] = {"transport": args.transport, "error": None}
    server: RunningServer | None = None
    httpd: http.server.ThreadingHTTPServer | None = None
    status = 0
    started = time.monotonic()
    try:
        server = start_server(
            args.workdir / "turnd",
            listen_udp=["127.0.0.1:0"],
            listen_tcp=["127.0.0.1:0"],
            listen_tls=["127.0.0.1:0"],
            log_format="json",
        )
        verdict["listeners"] = server.info.get("listeners", [])
        port = server.port(args.transport)
        url = ice_url(args.transport, port)
        creds = mint_credentials(server.secret, f"{USER}-{args.transport}", TTL_S)
        verdict["url"] = url
        verdict["username"] = creds.username
        httpd = start_page_server()
        page_url = f"http://127.0.0.1:{httpd.server_address[1]}/call.html"
        ice_servers = [{"urls": [url], "username": creds.username, "credential": creds.password}]
        verdict["page"], verdict["console"] = run_browser(
            page_url, ice_servers, args.workdir, args.messages, args.call_timeout)
        wait_for_usage(server, f"{USER}-{args.transport}", 2, USAGE_WAIT_S)
    except Exception as exc:  # the verdict says what went wrong; the test shows it
        verdict["error"] = f"{type(exc).__name__}: {exc}"
        status = 2
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if server is not None:
            verdict["server_exit"] = server.stop()
            log_text = server.log_text()
            verdict["usage"] = usage_records(log_text)
            verdict["server_log_tail"] = log_text.splitlines()[-40:]
        verdict["elapsed_s"] = round(time.monotonic() - started, 3)
    print(json.dumps(verdict), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
