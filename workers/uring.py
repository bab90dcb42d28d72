"""The smallest io_uring the spool needs: fsync without a thread.

Why: a commit is fsync(file), rename into the queue, fsync(queue folder). Done on a
thread, each of those system calls gives up the GIL and must take it back from a busy
event loop, and the thread must be woken and must wake the loop after. On the
forwarding benchmark about half of the ~2 ms a commit took was that waiting, not the
disk. With io_uring the kernel runs the fsync and says it is done through an eventfd the
event loop watches: nothing of ours waits for the GIL.

Written against the kernel's ABI (``include/uapi/linux/io_uring.h``) with ctypes and mmap
from the standard library, for one opcode. Where io_uring is missing or forbidden (a
kernel before 5.5, a container's seccomp profile, ``kernel.io_uring_disabled``),
:class:`Ring` raises ``OSError`` and the spool keeps its commit thread.

Linked requests are not used on purpose: a failed rename or link does not break a link
chain on current kernels (tried on 6.18), so the event loop renames between the fsyncs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
from typing import Final

# System call numbers, the same on every architecture (added in 5.1 to the common table).
_SYS_SETUP: Final = 425
_SYS_ENTER: Final = 426
_SYS_REGISTER: Final = 427

_REGISTER_EVENTFD: Final = 4
_FEAT_SINGLE_MMAP: Final = 1 << 0
_FEAT_NODROP: Final = 1 << 1  # 5.5: completions are never dropped

_OFF_SQ_RING: Final = 0
_OFF_CQ_RING: Final = 0x8000000
_OFF_SQES: Final = 0x10000000

_OP_FSYNC: Final = 3
_IOSQE_ASYNC: Final = 1 << 4  # fsync always blocks: straight to the kernel's workers

# struct io_uring_sqe, 64 bytes: opcode, flags, ioprio, fd, off, addr, len, op flags,
# user_data, buf_index, personality, splice_fd_in, addr3, pad.
_SQE: Final = struct.Struct("=BBHiQQIIQHHiQQ")
_CQE: Final = struct.Struct("=QiI")  # user_data, res, flags
_U32: Final = struct.Struct("=I")


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
        # io_sqring_offsets: head tail ring_mask ring_entries flags dropped array resv1
        ("sq_off", ctypes.c_uint32 * 8), ("sq_user_addr", ctypes.c_uint64),
        # io_cqring_offsets: head tail ring_mask ring_entries overflow cqes flags resv1
        ("cq_off", ctypes.c_uint32 * 8), ("cq_user_addr", ctypes.c_uint64),
    ]


_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"io_uring {what}: {os.strerror(err)}")
    return result


class Ring:
    """An io_uring for fsync requests, with an eventfd readable when some complete.

    :meth:`fsync` queues fsyncs and enters the kernel once; :meth:`completions` gives
    ``(user_data, result)`` for every finished one, ``result`` being 0 or ``-errno``.
    Not thread-safe: one event loop owns it.
    """

    def __init__(self, entries: int = 256) -> None:
        params = _Params()
        self.fd = -1
        self.eventfd = -1
        self._maps: list[mmap.mmap] = []
        self.fd = _check(_syscall(_SYS_SETUP, entries, ctypes.byref(params)), "setup")
        try:
            if not params.features & _FEAT_NODROP:
                raise OSError(errno.ENOSYS, "io_uring without IORING_FEAT_NODROP")
            sq, cq = params.sq_off, params.cq_off
            sq_size = sq[6] + params.sq_entries * 4
            cq_size = cq[5] + params.cq_entries * _CQE.size
            if params.features & _FEAT_SINGLE_MMAP:
                sq_map = cq_map = self._map(max(sq_size, cq_size), _OFF_SQ_RING)
            else:
                sq_map, cq_map = self._map(sq_size, _OFF_SQ_RING), self._map(cq_size,
                                                                             _OFF_CQ_RING)
            self._sqes = self._map(params.sq_entries * _SQE.size, _OFF_SQES)
            self._sq, self._cq = sq_map, cq_map
            self._sq_entries, self._cq_entries = params.sq_entries, params.cq_entries
            self._sq_tail, self._sq_array = sq[1], sq[6]
            self._sq_mask = _U32.unpack_from(sq_map, sq[2])[0]
            self._cq_head, self._cq_tail, self._cqes = cq[0], cq[1], cq[5]
            self._cq_mask = _U32.unpack_from(cq_map, cq[2])[0]
            self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            efd = ctypes.c_int32(self.eventfd)
            _check(_syscall(_SYS_REGISTER, self.fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1),
                   "register eventfd")
        except BaseException:
            self.close()
            raise
        self.in_flight = 0

    def _map(self, size: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=offset)
        self._maps.append(m)
        return m

    @property
    def room(self) -> int:
        """How many more requests the ring takes now."""
        return min(self._sq_entries, self._cq_entries - self.in_flight)

    def fsync(self, requests: list[tuple[int, int]]) -> None:
        """fsync each ``(fd, user_data)``, all submitted with one system call.

        Raises ``OSError`` (and submits nothing) beyond :attr:`room`.
        """
        if len(requests) > self.room:
            raise OSError(errno.EBUSY, f"io_uring full: {self.in_flight} in flight")
        tail = _U32.unpack_from(self._sq, self._sq_tail)[0]
        for fd, user_data in requests:
            index = tail & self._sq_mask
            _SQE.pack_into(self._sqes, index * _SQE.size, _OP_FSYNC, _IOSQE_ASYNC, 0, fd,
                           0, 0, 0, 0, user_data, 0, 0, 0, 0, 0)
            _U32.pack_into(self._sq, self._sq_array + index * 4, index)
            tail = (tail + 1) & 0xFFFF_FFFF
        # Without SQPOLL the kernel reads the tail only inside io_uring_enter: the
        # system call orders these stores before its reads on every architecture.
        _U32.pack_into(self._sq, self._sq_tail, tail)
        left = len(requests)
        while left:
            done = _syscall(_SYS_ENTER, self.fd, left, 0, 0, None, 0)
            if done < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            left -= _check(done, "enter")
        self.in_flight += len(requests)

    def completions(self) -> list[tuple[int, int]]:
        """Every completed request as ``(user_data, result)``; resets the eventfd."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.eventfd)
        head = _U32.unpack_from(self._cq, self._cq_head)[0]
        tail = _U32.unpack_from(self._cq, self._cq_tail)[0]
        done = []
        while head != tail:
            user_data, result, _ = _CQE.unpack_from(
                self._cq, self._cqes + (head & self._cq_mask) * _CQE.size)
            done.append((user_data, result))
            head = (head + 1) & 0xFFFF_FFFF
        _U32.pack_into(self._cq, self._cq_head, head)
        self.in_flight -= len(done)
        return done

    def close(self) -> None:
        """Release the ring. Requests in flight still complete in the kernel."""
        for m in self._maps:
            m.close()
        self._maps.clear()
        for name in ("eventfd", "fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
