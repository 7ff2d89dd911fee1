"""Real receivers for the notifier's tests: an SMTP server (aiosmtpd) or an HTTP server
taking webhook POSTs (http.server). Each message received is printed on stderr as one
JSON line; `ready` on stdout once listening.

    notify_peers.py smtp PORT      # {"via": "smtp", "from", "to", "subject", "body"}
    notify_peers.py http PORT      # {"via": "http", "path", "body"} (body parsed as JSON)
"""

from __future__ import annotations

import email
import email.policy
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def emit(record: dict) -> None:
    record["t"] = time.time()
    print(json.dumps(record), file=sys.stderr, flush=True)


class Smtp:
    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd API)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        emit({"via": "smtp", "from": envelope.mail_from, "to": envelope.rcpt_tos,
              "subject": str(msg["subject"]), "body": msg.get_content()})
        return "250 OK"


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        n = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        emit({"via": "http", "path": self.path, "body": body})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "smtp":
        from aiosmtpd.controller import Controller

        c = Controller(Smtp(), hostname="127.0.0.1", port=port)
        c.start()
        print("ready", flush=True)
        while True:
            time.sleep(3600)
    else:
        srv = ThreadingHTTPServer(("127.0.0.1", port), Hook)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        print("ready", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
