"""A kernel build killed midway leaves torch's lock file behind; the next start must not wait on it for ever."""

import os
import threading
import time

from clex_serve.kernels.cpu_extension import STALE_LOCK_SECONDS, _clear_stale_lock


def test_a_lock_older_than_any_build_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    _clear_stale_lock(lock)
    assert not lock.exists()


def test_a_live_build_is_waited_for(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    finished = threading.Timer(0.5, lock.unlink)  # the other process's build ends
    finished.start()
    _clear_stale_lock(lock)
    finished.join()
    assert not lock.exists() and not finished.is_alive()
