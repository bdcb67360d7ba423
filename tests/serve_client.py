"""`python -m fr_jax.serve` as a subprocess for the tests, and raw HTTP to it."""

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from cli_env import REPO, one_device_env

READY_TIMEOUT = 300  # s: loading the bundled world and compiling every program


class Server:
    """A server on 127.0.0.1 (a free port), started with `args`; `url` once ready. Its
    stdout is kept in `lines`."""

    def __init__(self, home, *args, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fr_jax.serve", "--port=0", *args], cwd=REPO,
            env=dict(one_device_env(home), **(env or {})), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines, self._lines = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.port = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self):
        end = time.time() + READY_TIMEOUT
        while time.time() < end:
            try:
                line = self._lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("the server exited:\n" + "".join(self.lines)[-4000:])
            if line.startswith("listening on "):
                self.url = line.split()[2]
                self.port = int(self.url.rsplit(":", 1)[1])
            if line.startswith("ready in "):
                return self
        raise AssertionError("the server was not ready:\n" + "".join(self.lines)[-4000:])

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, headers, body bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        _, _, body = self.request("GET", "/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{") and " " in line:
                if line.split(" ")[0] == name:
                    return float(line.split(" ")[1])
        return 0.0

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("the server did not stop:\n" + "".join(self.lines)[-4000:])
