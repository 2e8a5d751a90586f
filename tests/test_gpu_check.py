"""scripts/gpu_check.py is for a machine with a GPU; here (no GPU) it must say so and exit 2, not
crash or pretend."""
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_refuses_clearly_without_a_gpu():
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        import pytest
        pytest.skip("a GPU is present: run scripts/gpu_check.py itself")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout.startswith("FAIL no GPU visible") and "Traceback" not in out.stderr
