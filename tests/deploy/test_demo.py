"""deploy/demo.py's LocalPrefect: a server that hangs on start says where, and is replaced."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
import demo  # noqa: E402

# Stands in for `python -m prefect server start` that never answers: it listens on nothing, and
# writes its stack on SIGUSR1 as the real server's wrapper does.
HANGING_SERVER = [sys.executable, "-c", "import faulthandler, signal, time; "
                  "faulthandler.register(signal.SIGUSR1, all_threads=True); "
                  "print('starting', flush=True)\n"
                  "def wait_for_a_database_that_never_comes():\n"
                  "    time.sleep(600)\n"
                  "wait_for_a_database_that_never_comes()"]


@pytest.mark.slow
def test_a_hung_server_is_replaced_once_then_reported_with_its_stack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "SERVER", HANGING_SERVER)
    prefect = demo.LocalPrefect(tmp_path, ui=False)
    first_url = prefect.url
    with pytest.raises(RuntimeError) as failure:
        prefect.start_server(timeout=3, attempts=2)
    message = str(failure.value)
    assert prefect.url != first_url  # the second try had its own port and database
    assert prefect.env["PREFECT_API_URL"] == f"{prefect.url}/api"
    assert "prefect-2.db" in prefect.env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert f"the Prefect server on {prefect.url} did not come up (alive but not answering" in message
    assert f"--- {first_url} did not come up; starting again on {prefect.url} ---" in message
    assert "Where its threads were:" in message
    assert "wait_for_a_database_that_never_comes" in message
    assert prefect.processes == []  # both stopped


@pytest.mark.slow
def test_a_server_that_lost_its_port_is_given_up_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn cannot bind (another process took the port after Prefect checked it) but the
    process lives on: no point waiting out the timeout on a port someone else answers."""
    monkeypatch.setattr(demo, "SERVER", [
        sys.executable, "-c", "import time; print(\"ERROR: [Errno 98] error while attempting to "
        "bind on address ('127.0.0.1', 1): address already in use\", flush=True); time.sleep(600)"])
    prefect = demo.LocalPrefect(tmp_path, ui=False)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="another process took its port"):
        prefect.start_server(timeout=120, attempts=1)
    assert time.monotonic() - started < 60
    assert prefect.processes == []


def test_health_checks_go_direct_whatever_proxy_urllib_remembers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """urlopen's shared opener keeps the proxies of its first use (torch.hub's download in
    tests/flowerml/models/test_weights.py ran with a dead proxy before the deployment tests, on the
    same xdist worker, and every health check after it went to that proxy)."""
    import http.server
    import subprocess
    import threading
    import urllib.request

    answering = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=answering.serve_forever, daemon=True).start()
    dead_proxy = f"http://127.0.0.1:{demo.free_port()}"
    monkeypatch.setattr(urllib.request, "_opener", None)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{answering.server_address[1]}/", timeout=5)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name)  # gone from the environment, kept by urlopen's opener

    prefect = demo.LocalPrefect(tmp_path, ui=False)
    prefect.url = f"http://127.0.0.1:{answering.server_address[1]}"
    (tmp_path / "server.log").write_text("")
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prefect._wait_for_health(stand_in, timeout=20)  # returns: it answered
    finally:
        stand_in.kill()
        stand_in.wait()
        answering.shutdown()
