"""OpenMP's waiting is set before torch loads (a short spin), unless the user chose; glibc's allocator is kept from hoarding."""

import json
import os
import platform
import subprocess
import sys

import pytest

SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ATLASDGD_OMP_WAIT_POLICY")
PROBE = "import {order}, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def _run(order: str = "atlasdgd, torch", **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    return subprocess.run([sys.executable, "-c", PROBE.format(order=order)], env={**clean, **env},
                          capture_output=True, text=True, check=True, timeout=120)


@pytest.mark.parametrize("env,expected", [({}, "None 3000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
                                          ({"GOMP_SPINCOUNT": "0"}, "None 0"),
                                          ({"ATLASDGD_OMP_WAIT_POLICY": "default"}, "None None")])
def test_a_short_spin_unless_the_user_chose(env, expected):
    assert _run(**env).stdout.strip().splitlines()[-1] == expected


def test_ray_workers_get_the_same_settings(monkeypatch):
    from atlasdgd.runtime.threads import worker_environment

    for key in SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "3000")  # as this process has it
    assert worker_environment() == {"GOMP_SPINCOUNT": "3000"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert worker_environment() == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}


def test_too_late_once_torch_is_loaded_so_the_environment_is_left_alone():
    out = _run("torch, atlasdgd")
    assert out.stdout.strip().splitlines()[-1] == "None None"  # set now, it would claim an effect it cannot have
    assert "torch was imported before atlasdgd" in out.stderr and "GOMP_SPINCOUNT=3000" in out.stderr


@pytest.mark.parametrize("order,env", [("atlasdgd, torch", {}), ("torch, atlasdgd", {"OMP_WAIT_POLICY": "ACTIVE"}),
                                       ("torch, atlasdgd", {"GOMP_SPINCOUNT": "1000"}),
                                       ("torch, atlasdgd", {"ATLASDGD_OMP_WAIT_POLICY": "default"})])
def test_no_warning_when_the_setting_is_in_place_or_chosen(order, env):
    assert "torch was imported before atlasdgd" not in _run(order, **env).stderr


def test_malloc_arenas_are_capped_unless_the_user_chose(monkeypatch):
    from atlasdgd.runtime.malloc import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the user's choice is kept
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("ATLASDGD_MALLOC_ARENAS", "default")
    assert limit_malloc_arenas() is False
    monkeypatch.delenv("ATLASDGD_MALLOC_ARENAS")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert limit_malloc_arenas() is glibc


RELEASE_CHILD = r"""
import ctypes, json
from atlasdgd.runtime.malloc import release_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
blocks = [libc.malloc(64 * 1024) for _ in range(2000)]  # 125 MiB below the mmap threshold: the heap
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
for b in blocks[::2]:  # every other block freed: holes between live blocks, out of the top trim's reach
    libc.free(b)
before = rss()
released = release_free_memory()
print(json.dumps({"released": released, "freed_mib": (before - rss()) / 2**20}))
"""


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_free_memory_between_live_blocks_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", RELEASE_CHILD], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["released"] is True
    assert result["freed_mib"] > 0.8 * 62.5  # the 1,000 freed 64 KiB blocks


def test_the_loader_trims_once_in_a_steady_phase_and_again_whenever_it_grows(monkeypatch):
    from atlasdgd.runtime import malloc

    rss, trims = [0], []
    monkeypatch.setattr(malloc, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(malloc, "release_free_memory", lambda: trims.append(rss[0]) or True)
    trim, mib = malloc.TrimWhenGrown(threshold=16 << 20), 1 << 20

    def window(size_mib: int) -> bool:
        rss[0] = size_mib * mib
        return trim()

    assert window(500)  # the first window always
    # steady: the working set after the trim (510) is the level; +/- a few MiB is no growth
    assert not any(window(m) for m in (510, 515, 505, 526, 520))
    assert window(527)  # 17 MiB over the level: trimmed, and the level is learnt again
    assert not window(600)  # the level after that trim
    assert not window(616) and window(617)
    assert len(trims) == 3
    # no resident set to read (not Linux): never trims
    monkeypatch.setattr(malloc, "resident_bytes", lambda: None)
    assert not malloc.TrimWhenGrown()()
