"""Light imports: a flow-run name, `--help` and the recipes never load torch (seconds on a
loaded 2-core machine). Each case runs in a fresh interpreter, as a worker or a shell does."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case starts an interpreter


@pytest.mark.parametrize("code", [
    "import flows.retrain",
    "import flows.ingest",
    "import flowerml.core.recipes",
    "import flowerml.cli",
    "from flows.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass",
    "from flows.cli import main\ntry:\n    main(['retrain', '--help'])\nexcept SystemExit: pass",
    "from flows.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit: pass",
])
def test_no_torch_on_import(code: str) -> None:
    program = f"import sys\n{code}\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
