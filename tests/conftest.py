"""Fixtures of the bitw system tests.

The tests drive the real `bitw-dataplane` binary through DPDK virtual devices.
They need the release build (or $BITW_DATAPLANE) and root (DPDK); when either is
missing they fail loudly instead of being skipped, so a CI run without them
cannot look green.
"""

import glob
import os
import re
import stat
from pathlib import Path

import pytest

from bitw_testlib import DEFAULT_BINARY, REPO_ROOT, TEST_PREFIX_STEM, unique_prefix


@pytest.fixture(scope="session")
def dataplane():
    """Path of the bitw-dataplane binary under test."""
    if os.geteuid() != 0:
        pytest.fail("the bitw system tests need root (DPDK): run them as root, "
                    "e.g. `sudo /usr/bin/python3 -m pytest -v tests/`")
    env = os.environ.get("BITW_DATAPLANE")
    path = Path(env) if env else DEFAULT_BINARY
    if not path.is_file() or not os.access(path, os.X_OK):
        how = (f"$BITW_DATAPLANE={env}" if env else
               f"{path} (build it with `cargo build --release` in {REPO_ROOT}, "
               "or set $BITW_DATAPLANE)")
        pytest.fail(f"bitw-dataplane binary not found or not executable: {how}")
    return path.resolve()


@pytest.fixture(scope="session", autouse=True)
def _remove_dpdk_runtime_dirs():
    """EAL leaves an empty /var/run/dpdk/<file-prefix>/ per run: remove ours afterwards."""
    yield
    for d in glob.glob(f"/var/run/dpdk/{TEST_PREFIX_STEM}*"):
        try:
            os.rmdir(d)  # only if empty: never delete what a run left inside
        except OSError:
            pass


@pytest.fixture
def file_prefix(request):
    """A DPDK --file-prefix unique to this test (and to this call)."""
    return unique_prefix(re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:24])


@pytest.fixture
def demo_keys_private():
    """git does not keep file modes: make the demo's key files 0600, as
    scripts/demo.sh does (bitw refuses key files others can read). Returns the
    demo directory."""
    demo = REPO_ROOT / "configs" / "demo"
    keys = sorted(demo.glob("*.key"))
    assert keys, f"no key files in {demo}"
    for key in keys:
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:
            os.chmod(key, mode & 0o700)
    return demo
