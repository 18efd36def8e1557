"""The CUDA host API's bookkeeping, under the emulator's two fake devices: one status word per
(device, stream), deferred status reads, a per-thread block size, and launch errors that are
this call's own."""
import os
import re
import threading

import numpy as np
import pytest

from helpers import REPO
from pymoe.backend import cuda_backend

OWNER_BAD = np.array([[0, 6]])  # slot_owner entry 6 >= T*K = 3*2: invalid


@pytest.fixture(scope="module")
def be(cuda_emulator_path):
    loaded, info = cuda_backend.load(cuda_emulator_path)
    assert loaded is not None and loaded.emulated, info.detail
    return loaded


def dispatch(be, owner, check=True):
    return be.dispatch(np.ones((3, 4)), owner, 2, check=check)


def test_each_device_has_its_own_status_word(be):
    """A kernel on device 1 reports into device 1's word; device 0's stays clean. (The emulator
    fails any atomic on another device's memory, so a shared word would fail the launch.)"""
    with be.device(1):
        assert be.get_device() == 1
        with pytest.raises(ValueError, match="slot_owner entry is outside"):
            dispatch(be, OWNER_BAD)
        dispatch(be, OWNER_BAD, check="defer")
    be.check_status()  # device 0: nothing happened there
    with be.device(1), pytest.raises(ValueError, match="slot_owner entry is outside"):
        be.check_status()
    with be.device(1):
        be.check_status()  # read once, then zero again


def test_a_status_word_of_another_device_is_caught(be):
    """The bug this design removes: the word allocated on device 0, written by a kernel running
    on device 1. The emulator fails that launch."""
    ffi, lib = be.ffi, be.lib
    slot = ffi.new("int **")
    assert lib.pymoe_cuda_status(slot, ffi.NULL) == 0  # device 0's word
    x, out = np.ones((3, 4)), np.empty((1, 2, 4))
    with be.device(1):
        code = lib.pymoe_cuda_dispatch_f64(ffi.cast("double *", out.ctypes.data),
                                           ffi.cast("double *", x.ctypes.data),
                                           ffi.cast("int64_t *", OWNER_BAD.ctypes.data), ffi.NULL,
                                           3, 2, 1, 2, 4, slot[0], ffi.NULL)
    assert "atomicOr on memory of device 0 by a kernel running on device 1" in be._error(code)


def test_each_stream_has_its_own_status_word(be):
    with be.stream(7):
        dispatch(be, OWNER_BAD, check="defer")
    with be.stream(9):
        dispatch(be, np.array([[0, 1]]), check="defer")
        be.check_status()  # stream 9 saw valid input only
    be.check_status()  # the default stream too
    with be.stream(7), pytest.raises(ValueError, match="slot_owner entry is outside"):
        be.check_status()


def test_deferred_bits_accumulate_until_read(be):
    dispatch(be, OWNER_BAD, check="defer")
    be.combine(np.ones((2, 2, 4)), np.array([[0, 1]]), np.array([[0, 2]]), check="defer")
    with pytest.raises(ValueError, match="position entry is outside.*slot_owner entry"):
        be.check_status()
    be.check_status()
    dispatch(be, OWNER_BAD, check=False)  # no bookkeeping at all
    be.check_status()
    with pytest.raises(ValueError, match="check: expected True, False or 'defer'"):
        dispatch(be, OWNER_BAD, check="later")


def test_block_size_is_per_host_thread(be):
    """Two threads set different block sizes and launch concurrently; each keeps its own."""
    rng = np.random.default_rng(0)
    x, owner = rng.normal(size=(40, 24)), np.arange(80).reshape(8, 10) - 1
    want = be.dispatch(x, owner, 2)
    mine = be.get_block_size()
    errors, barrier = [], threading.Barrier(2)

    def work(threads):
        try:
            with be.block_size(threads):
                barrier.wait()
                for _ in range(5):
                    np.testing.assert_array_equal(be.dispatch(x, owner, 2), want)
                    assert be.get_block_size() == threads
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    workers = [threading.Thread(target=work, args=(n,)) for n in (32, 512)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    assert be.get_block_size() == mine


def test_a_bad_device_is_a_clear_error(be):
    with pytest.raises(ValueError, match="device: cannot select device 5"):
        with be.device(5):
            pass


def test_launches_do_not_read_the_global_last_error():
    """Launch errors come from cudaLaunchKernelEx's return value: cudaGetLastError would also
    report, and clear, an error some other library (CuPy, a framework) left pending."""
    path = os.path.join(REPO, "csrc", "cuda", "pymoe_cuda.cu")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    assert not re.search(r"cuda(GetLast|PeekAtLast)Error\s*\(", src)
    assert "cudaLaunchKernelEx(&cfg, kernel, args...)" in src


def test_error_messages_are_the_c_cores(be):
    """Every pymoe error code reads the same from the CUDA library as from the C core
    (pymoe_error_string, written once); each status bit stands for one of those codes."""
    from pymoe.backend import c_backend

    c, info = c_backend.load()
    if c is None:
        pytest.skip(f"C backend unavailable: {info.detail}")
    codes = [v for k, v in vars(c.lib).items() if k.startswith("PYMOE_ERR_")]
    assert len(codes) >= 8
    for code in codes:
        want = be.ffi.string(be.lib.pymoe_cuda_error_string(code)).decode()
        got = c.ffi.string(c.lib.pymoe_error_string(code)).decode()
        assert want == got or (code == c.lib.PYMOE_ERR_SIZE and want.startswith(got)), code
        assert be.ffi.string(be.lib.pymoe_cuda_error_name(code)).decode().startswith("PYMOE_ERR_")
    bits = {be.lib.PYMOE_BAD_EXPERT: c.lib.PYMOE_ERR_EXPERT,
            be.lib.PYMOE_BAD_POSITION: c.lib.PYMOE_ERR_POSITION,
            be.lib.PYMOE_BAD_OWNER: c.lib.PYMOE_ERR_OWNER,
            be.lib.PYMOE_BAD_ORDER: c.lib.PYMOE_ERR_ORDER, be.lib.PYMOE_BAD_NAN: c.lib.PYMOE_ERR_NAN}
    for bit, code in bits.items():
        assert be.lib.pymoe_cuda_status_code(bit) == code
    assert be.lib.pymoe_cuda_status_code(3) == 0
