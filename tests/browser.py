"""Headless Chromium driven over the DevTools protocol (no Selenium): open the service's page,
choose an image in its file input, wait for the status line, screenshot the page. Used by
tests/test_serve.py where `chromium` is installed, and by hand for docs/serve_page.png:

    python -m tests.browser http://127.0.0.1:8000/ IMAGE.png docs/serve_page.png
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.local_cluster import free_port


class _Tab:
    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect  # ray[serve] brings websockets

        self.ws = connect(ws_url, max_size=None)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        k = next(self.ids)
        self.ws.send(json.dumps({"id": k, "method": method, "params": params}))
        while True:  # events arrive in between; only our answer counts
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == k:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")


def drive_page(url: str, image: Path, screenshot: Path, timeout_s: float = 60.0) -> str:
    """Open `url`, choose `image` in the page's file input, wait for the page to report; write a
    PNG screenshot; return the status line's text."""
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [
                "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--window-size=900,700",
                f"--remote-debugging-port={port}",
                "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            tab = _Tab(_page_socket(port, timeout_s))
            tab.call("Page.enable")
            tab.call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout_s
            while tab.evaluate("document.readyState") != "complete":
                _wait(deadline, "the page to load")
            root = tab.call("DOM.getDocument")["root"]["nodeId"]
            node = tab.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            tab.call("DOM.setFileInputFiles", nodeId=node, files=[str(Path(image).resolve())])
            while not tab.evaluate("document.getElementById('status').dataset.persons"):
                _wait(deadline, "the page's answer")
            status = tab.evaluate("document.getElementById('status').textContent")
            shot = tab.call("Page.captureScreenshot", format="png")["data"]
            Path(screenshot).write_bytes(base64.b64decode(shot))
            tab.ws.close()
            return status
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def _page_socket(port: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        _wait(deadline, "Chromium's DevTools")


def _wait(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"waited too long for {what}")
    time.sleep(0.1)


if __name__ == "__main__":
    print(drive_page(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
