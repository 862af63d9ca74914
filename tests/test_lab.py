"""`make lab` starts JupyterLab (as root too: this suite runs as root in CI), `/lab` answers, and the
notebooks' `python3` kernel is the project's interpreter. Headless: no browser, a free port, a token."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, token: str, method: str = "GET", body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def _cmdline_with(text: str, deadline: float) -> list[str]:
    """The command line of the process whose arguments mention `text` (waits for it to appear)."""
    while time.time() < deadline:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv = proc.joinpath("cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if any(text in a for a in argv):
                return argv
        time.sleep(0.2)
    raise AssertionError(f"no process started with {text!r}")


def test_make_lab_serves_the_notebooks_on_the_project_interpreter(tmp_path):
    port, token = _free_port(), "gm-test"
    args = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token} --ServerApp.port_retries=0"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    # -o: the venv is this interpreter's, do not rebuild it; PY: this interpreter
    lab = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "lab", f"PY={sys.executable}", f"LAB_ARGS={args}"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and lab.poll() is None:
            try:
                status, _ = _call(f"{base}/lab", token)
                break
            except OSError:
                time.sleep(0.5)
        if status is None:
            lab.kill()
            raise AssertionError(f"JupyterLab did not answer on {base}:\n{lab.stdout.read().decode()[-3000:]}")
        assert status == 200
        specs = json.loads(_call(f"{base}/api/kernelspecs", token)[1])
        assert specs["default"] == "python3"
        # the kernel a notebook gets: started through the server, its process's interpreter is this one
        kernel = json.loads(_call(f"{base}/api/kernels", token, "POST", {"name": "python3"})[1])
        argv = _cmdline_with(f"kernel-{kernel['id']}.json", time.time() + 60)
        assert os.path.abspath(argv[0]) == os.path.abspath(sys.executable), argv  # the venv, not its base python
        _call(f"{base}/api/kernels/{kernel['id']}", token, "DELETE")
    finally:
        os.killpg(lab.pid, 15)
        lab.wait(timeout=30)
