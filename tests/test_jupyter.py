"""JupyterLab as a user starts it (``jupyter lab --no-browser``): it lists the notebooks, serves the lab,
runs a notebook through the server's kernel API (REST for the session, the kernel's websocket channels for
the cells) and stops cleanly.

The server runs on 127.0.0.1, a free port and a random token, with its config, data and runtime folders
in a temporary folder; its kernel is this test's interpreter (the ``jupyter_path`` fixture). The notebook
runs in quick mode on synthetic data, as in tests/test_notebooks.py.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab")
websocket = pytest.importorskip("websocket")  # websocket-client

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
NOTEBOOK = "notebooks/01_quickstart.ipynb"  # the quickest in quick mode (seconds)
START_TIMEOUT_S = 120
CELL_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running ``jupyter lab`` and small REST helpers (token in the Authorization header)."""

    def __init__(self, tmp: Path, jupyter_path: Path) -> None:
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline backend
        env.update(JUPYTER_PATH=str(jupyter_path), JUPYTER_CONFIG_DIR=str(tmp / "config"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_DATA_DIR=str(tmp / "data"),
                   IPYTHONDIR=str(tmp / "ipython"), BAME_NOTEBOOK_MODE="quick", BAME_NOTEBOOK_DATA="synthetic",
                   BAME_NOTEBOOK_RUNS=str(tmp / "runs"))
        jupyter = Path(sys.executable).parent / "jupyter"
        assert jupyter.is_file(), f"no {jupyter}: install the dev extra (pip install -e '.[dev]')"
        self.log = open(tmp / "lab.log", "w")  # noqa: SIM115 - closed in stop()
        root_user = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # CI containers
        self.proc = subprocess.Popen(
            [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}", "--port-retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={ROOT}", *root_user],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: dict | None = None, token: bool = True) -> tuple[int, bytes]:
        headers = {"Authorization": f"token {self.token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def json(self, method: str, path: str, body: dict | None = None) -> dict | list:
        status, data = self.request(method, path, body)
        assert 200 <= status < 300, (method, path, status, data[:300])
        return json.loads(data)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"jupyter lab exited with {self.proc.returncode}: {self.log_text()}"
            try:
                if self.request("GET", "/api/status")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"jupyter lab did not answer within {START_TIMEOUT_S} s: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _execute(ws, session: str, code: str) -> list[dict]:
    """Run ``code`` on the kernel behind ``ws``; returns the iopub messages it caused, up to idle."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request",
                   "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    outputs, replied, idle = [], False, False
    deadline = time.monotonic() + CELL_TIMEOUT_S
    while not (replied and idle):
        assert time.monotonic() < deadline, f"no reply within {CELL_TIMEOUT_S} s to: {code[:200]}"
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["channel"] == "shell" and msg["msg_type"] == "execute_reply":
            replied = True
            assert msg["content"]["status"] == "ok", (code[:200], msg["content"])
        elif msg["channel"] == "iopub":
            if msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
            elif msg["msg_type"] in ("stream", "display_data", "execute_result", "error"):
                outputs.append(msg)
    return outputs


def test_jupyter_lab_lists_serves_and_runs_a_notebook(tmp_path, jupyter_path):
    lab = Lab(tmp_path, jupyter_path)
    try:
        lab.wait_ready()
        listing = lab.json("GET", "/api/contents/notebooks")
        assert sorted(item["name"] for item in listing["content"] if item["type"] == "notebook") == NOTEBOOKS
        assert len(NOTEBOOKS) == 5
        status, page = lab.request("GET", "/lab")
        assert status == 200 and b"JupyterLab" in page
        assert lab.request("GET", "/api/contents/notebooks", token=False)[0] == 403  # the token is needed

        session = lab.json("POST", "/api/sessions", {"path": NOTEBOOK, "type": "notebook",
                                                    "kernel": {"name": "python3"}})
        kernel = session["kernel"]["id"]
        notebook = lab.json("GET", f"/api/contents/{NOTEBOOK}")["content"]
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel}/channels?token={lab.token}", timeout=CELL_TIMEOUT_S)
        try:
            shown: dict[str, list[dict]] = {}
            for cell in notebook["cells"]:
                if cell["cell_type"] == "code":
                    for tag in cell["metadata"].get("tags", []):
                        shown.setdefault(tag, []).extend(_execute(ws, session["id"], cell["source"]))
                    if not cell["metadata"].get("tags"):
                        _execute(ws, session["id"], cell["source"])
        finally:
            ws.close()
        assert any("image/png" in m["content"].get("data", {}) for m in shown["check-figure"])
        assert any("|" in m["content"].get("text", "") for m in shown["check-table"])
        assert list((tmp_path / "runs").rglob("DONE")), "the notebook trained no run into BAME_NOTEBOOK_RUNS"

        assert lab.request("DELETE", f"/api/sessions/{session['id']}")[0] == 204
        assert lab.json("GET", "/api/kernels") == []
        assert lab.request("POST", "/api/shutdown")[0] == 200
        assert lab.proc.wait(timeout=60) == 0, lab.log_text()
    finally:
        lab.stop()


@pytest.mark.slow
def test_make_notebooks_executes_every_notebook_to_html(tmp_path):
    """`make notebooks` (its set-up steps taken as done: this interpreter is the venv's python)."""
    pytest.importorskip("nbconvert")
    html = tmp_path / "html"
    env = dict(os.environ, BAME_NOTEBOOK_DATA="synthetic", BAME_NOTEBOOK_RUNS=str(tmp_path / "runs"),
               IPYTHONDIR=str(tmp_path / "ipython"))
    env.pop("MPLBACKEND", None)
    proc = subprocess.run(["make", "-o", "venv", "-o", "data", "notebooks", f"PY={sys.executable}",
                           f"NOTEBOOK_HTML={html}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.name for p in html.glob("*.html"))
    assert written == [name.replace(".ipynb", ".html") for name in NOTEBOOKS]
    for path in html.glob("*.html"):
        page = path.read_text()
        assert "data:image/png;base64" in page and "Traceback" not in page, path.name
