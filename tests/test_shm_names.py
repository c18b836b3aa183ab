"""`shm=NAME` opens /dev/shm/NAME safely: no symlink is followed, another
user's file or another kind of file is refused, and the target of a refused
name is left untouched; a new file is created mode 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbackend.errors import DeviceError
from qbackend.plumbing.shared_memory import SHM_DIR, SharedMemory


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"qbackend-test-{uuid.uuid4().hex[:12]}"
    yield name
    path = SHM_DIR / name
    if path.is_symlink() or path.exists():
        path.unlink()


def test_a_new_name_is_created_private(shm_name: str) -> None:
    memory = SharedMemory(4096, shm_name)
    try:
        st = os.lstat(SHM_DIR / shm_name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 4096
        memory.write(0, b"hello")
        assert (SHM_DIR / shm_name).read_bytes()[:5] == b"hello"
    finally:
        memory.close(unlink=True)
    assert not (SHM_DIR / shm_name).exists()


def test_a_symlink_is_refused_and_its_target_untouched(shm_name: str, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (SHM_DIR / shm_name).symlink_to(target)
    with pytest.raises(DeviceError, match="symlink"):
        SharedMemory(1 << 20, shm_name)
    assert target.read_bytes() == b"keep me"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
def test_another_users_file_is_refused(shm_name: str) -> None:
    path = SHM_DIR / shm_name
    path.write_bytes(b"theirs")
    os.chown(path, 65534, 65534)
    with pytest.raises(DeviceError, match="another user"):
        SharedMemory(4096, shm_name)
    assert path.read_bytes() == b"theirs"


def test_a_fifo_is_refused_without_blocking(shm_name: str) -> None:
    os.mkfifo(SHM_DIR / shm_name, 0o600)
    with pytest.raises(DeviceError, match="not a regular file"):
        SharedMemory(4096, shm_name)


def test_serve_with_a_symlinked_name_is_one_line(shm_name: str, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (SHM_DIR / shm_name).symlink_to(target)
    proc = subprocess.run([sys.executable, "-m", "qbackend", "serve", "--ivshmem",
                           f"socket={tmp_path / 'iv.sock'},shm={shm_name}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "symlink" in proc.stderr, proc.stderr
    assert target.read_bytes() == b"keep me" and not (tmp_path / "iv.sock").exists()
