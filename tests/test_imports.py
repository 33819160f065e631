"""Light imports: a flow-run name, `--help` and the recipes never load torch (seconds on a
loaded 2-core machine). They run in one fresh interpreter, as a worker or a shell does, each
checked as soon as it has run: the first that loads torch is the one named."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # it starts an interpreter

LIGHT = [
    "import flows.retrain",
    "import flows.ingest",
    "import flowerml.core.recipes",
    "import flowerml.cli",
    "from flows.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass",
    "from flows.cli import main\ntry:\n    main(['retrain', '--help'])\nexcept SystemExit: pass",
    "from flows.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit: pass",
]


def test_no_torch_on_import() -> None:
    checks = "".join(f"{code}\nassert 'torch' not in sys.modules, {code!r} + ' imported torch'\n"
                     for code in LIGHT)
    done = subprocess.run([sys.executable, "-c", f"import sys\n{checks}print('light')"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "light"

