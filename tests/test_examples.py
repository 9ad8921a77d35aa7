"""Every example runs against a live server: the Python clients (ZeroMQ and
WebSocket), the TypeScript client under Node, and the browser page in
headless Chromium. Under CI (`CI` set) Node and Chromium must be there
(.ci/system-deps installs them); elsewhere a missing tool skips its test."""

import base64
import contextlib
import functools
import http.server
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from websockets.sync.client import connect

from engram_shm import Client
from engram_shm.transport.launch import free_port, running_server

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
TYPESCRIPT = EXAMPLES / "typescript"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/system-deps installs it")
        pytest.skip(f"{name} is not installed (CI installs it with .ci/system-deps)")
    return path


@pytest.fixture(scope="module")
def server():
    """(ZeroMQ endpoint, ws:// URL) of a live server."""
    port = free_port()
    with running_server("--ws-port", str(port)) as (endpoint, name, proc):
        yield endpoint, f"ws://127.0.0.1:{port}/v1/stream"


def run_json(argv, timeout=600, **kwargs) -> dict:
    """Run an example; its last line is a JSON report."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_python_zmq_example(server):
    report = run_json([sys.executable, str(EXAMPLES / "python" / "zmq_stream.py"), server[0], "500"])
    assert (report["acked"], report["recalled"]) == (500, 500), report


def test_python_websocket_example(server):
    report = run_json([sys.executable, str(EXAMPLES / "python" / "ws_stream.py"), server[1], "500"])
    assert (report["acked"], report["recalled"]) == (500, 500), report


def test_typescript_example_streams_5000_resumes_and_recalls_them(server):
    node, npm = tool("node"), tool("npm")
    if not (TYPESCRIPT / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TYPESCRIPT, check=True, timeout=600)
    subprocess.run([node, "node_modules/typescript/bin/tsc", "-p", "."], cwd=TYPESCRIPT, check=True,
                   timeout=300)
    report = run_json([node, "dist/example.js", server[1], "5000", "64"], cwd=TYPESCRIPT)
    assert (report["streamed"], report["acked"], report["errors"]) == (5000, 5000, 0), report
    assert report["reconnects"] >= 1, report  # it dropped its connection halfway and resumed
    assert report["recalled"] >= 0.99 * 5000, f"recall@1 of the streamed vectors below 0.99: {report}"
    with Client(server[0]) as c:  # stored once each across the resume
        assert c.stats()["spaces"][report["space"]]["count"] == 5000


@contextlib.contextmanager
def static_site(directory):
    """An HTTP server of `directory` on a free loopback port; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class HeadlessChromium:
    """Chromium without a screen, driven through the DevTools protocol (a
    WebSocket, spoken with the `websockets` package the bridge uses): open a
    page, evaluate expressions in it, take a screenshot."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="engram-chromium-")
        # The network flags keep it from calling home: only the page's loopback traffic.
        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                      "--no-first-run", "--disable-background-networking",
                                      "--disable-component-update", "--disable-sync",
                                      "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                                      "--window-size=1000,1000", "--hide-scrollbars", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:  # it says where its DevTools listen, then goes on
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                break
        else:
            raise RuntimeError("chromium exited before listening")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # never block on a full pipe
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(match.group(1), max_size=None))
        self.ids = itertools.count(1)
        self.session = None

    def call(self, method: str, **params) -> dict:
        msg = {"id": next(self.ids), "method": method, "params": params}
        if self.session is not None:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg["id"]:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"the page never made {expression!r} true"
            time.sleep(0.1)
        return value

    def screenshot(self, path) -> None:
        pathlib.Path(path).write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        self.stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def test_browser_page_streams_100_and_shows_acks_and_a_recall(server, tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or tool("chromium")
    with static_site(EXAMPLES / "browser") as site:
        browser = HeadlessChromium(binary)
        try:
            browser.open(f"{site}/index.html?ws={server[1]}&n=100")
            browser.wait_for("document.body.dataset.done === 'true'", timeout=120)
            summary = browser.evaluate("document.getElementById('summary').textContent")
            acked = browser.evaluate("document.querySelectorAll('#acks span.acked').length")
            hits = browser.evaluate("[...document.querySelectorAll('#recall tr.hit td:first-child')]"
                                    ".map(td => td.textContent)")
            statuses = browser.evaluate("document.querySelectorAll('#status li').length")
            browser.screenshot(tmp_path / "page.png")
        finally:
            browser.close()
    assert summary == "acked 100 of 100; recall found 5", summary
    assert acked == 100 and statuses >= 1
    assert hits[0] == "page-42" and len(hits) == 5, hits  # the cue is observation 42's vector
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
