"""Repacked GGUF matrices kept in a file and mapped: shared by every process serving the same GGUF, no repack at start.

The repack (model/gguf_weights.py) rewrites most quantized matrices into the int8 kernels' 8-row groups. Done in
each process, those copies are private memory: two api_servers on one host hold two copies, and every start pays
the repack plus the first touch of the new memory (on some VMs 2 MB pages touched the first time cost ~2 s per
GiB, docs/benchmarks.md). So the first start writes the repacked bytes to `<dir>/<entry>.bin` (an index
`<entry>.json` beside it) and serves them from a read-only shared mapping of that file; later starts map it
without repacking, and every process on the host shares the page cache's one copy (as llama.cpp shares its mapped
GGUF). `--gguf-repack-cache none` turns this off.

An entry's name holds a digest of what decides its bytes: the GGUF file (absolute path, size, mtime, inode, 2 MiB
sampled from its header to its end), the
tensor-parallel rank and size, the architecture, and the source of the code that lays the bytes out (this module,
the loader, the reference layouts in ops/gguf_x8.py, which the kernels' repack is tested against, and the
kernels' layout header). Entries of the same GGUF path made from another version of the file or of that code, and entries
whose GGUF no longer exists, are deleted when a new entry is written; where the disk still lacks room for it, the
entries of other GGUFs used longest ago (an entry's index is touched at each start that maps it) are deleted until
it has, except those a running process maps (each holds a shared flock on the .bin it maps). Writes go to a
temporary file, which the writing process serves from at once;
a thread fsyncs it and renames it into place, so a reader sees a whole entry on disk or none. A cache that cannot be written (read-only, full disk) costs a warning, never the start.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import threading
import time
import weakref

import numpy as np
import torch

from lmserve.model import pages
from lmserve.ops.gguf_blocks import REPACKED, GGUFWeight

logger = logging.getLogger(__name__)

FORMAT = 1
# every matrix starts on a 2 MiB boundary (holes between: a sparse file), so the page cache can hold it in 2 MiB folios,
# mapped as huge pages where the filesystem makes them (ext4 on Linux 6.18: 98% of an 8B entry; at 4 KB alignment 74%)
ALIGN = 1 << 21
SPARE = 1 << 30                # leave this much of the disk free when writing an entry, and 5% of it
_LAYOUT_SOURCES = ("model/repack_cache.py", "model/gguf_weights.py", "model/gguf.py", "model/parallel.py",
                   "ops/gguf_x8.py", "csrc/cpu/gguf_x8.h")


def repack_cache_dir(setting: str) -> str | None:
    """--gguf-repack-cache -> the directory, None for "none" ("auto": $LMSERVE_REPACK_CACHE, which may say "none"
    too, else ~/.cache/lmserve/repacked)."""
    if setting == "auto":
        setting = os.environ.get("LMSERVE_REPACK_CACHE") or os.path.join("~", ".cache", "lmserve", "repacked")
    return None if setting == "none" else os.path.expanduser(setting)


@functools.cache
def _layout_digest() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(str(FORMAT).encode())
    for rel in _LAYOUT_SOURCES:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                h.update(f.read())
        except FileNotFoundError:     # an install without the C++ sources: the reference layouts still count
            h.update(f"no {rel}".encode())
    return h.hexdigest()[:12]


def _sample(path: str, size: int, pieces: int = 32, piece: int = 1 << 16) -> bytes:
    """2 MiB of the file, spread from its header to its end: a file rewritten in place with the same size and mtime
    (`cp -p` over it) still gets another entry (~2 ms from the page cache)."""
    with open(path, "rb") as f:
        return b"".join(os.pread(f.fileno(), piece, i * max(0, size - piece) // (pieces - 1)) for i in range(pieces))


class RepackCache:
    """One GGUF file's entry (this rank's share of it) in the cache directory `root`."""

    def __init__(self, root: str, gguf_path: str, cfg):
        real = os.path.realpath(gguf_path)
        st = os.stat(real)
        self.root = root
        self.source = real
        path_id = hashlib.sha256(real.encode()).hexdigest()[:12]
        version = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{_layout_digest()}".encode())
        version.update(_sample(real, st.st_size))
        rank = f"{cfg.architecture}-tp{getattr(cfg, 'tp_rank', 0)}of{getattr(cfg, 'tp_size', 1)}"
        stem = os.path.basename(real).removesuffix(".gguf")[:60]
        self.prefix = f"{stem}-{path_id}-"
        self.name = f"{self.prefix}{version.hexdigest()[:12]}-{rank}"
        self.rank = rank
        self.bin = os.path.join(root, self.name + ".bin")
        self.index = os.path.join(root, self.name + ".json")

    def load(self) -> dict[str, GGUFWeight]:
        """The entry's matrices mapped from its file, {} when there is no whole entry."""
        wait_for_writes()           # this process's own write of the entry (a reload), if one is still going
        try:
            with open(self.index) as f:
                index = json.load(f)
            if index.get("format") != FORMAT or os.path.getsize(self.bin) != index["bytes"]:
                return {}
            out = self._map(index)
        except (OSError, ValueError, KeyError) as e:
            if not isinstance(e, FileNotFoundError):
                logger.warning("repack cache entry %s unreadable (%s); repacking", self.index, e)
            return {}
        try:
            os.utime(self.index)        # used now: the last entry _make_room would delete
        except OSError:
            pass                        # a read-only cache
        return out

    def _map(self, index: dict, path: str | None = None) -> dict[str, GGUFWeight]:
        f = open(path or self.bin, "rb")
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)     # held while the mapping lives: _make_room leaves it alone
            except OSError:
                pass    # a filesystem without flock: served all the same (_make_room cannot lock it either: skips it)
            mm = mmap.mmap(f.fileno(), index["bytes"], flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            f.close()
            raise
        weakref.finalize(mm, f.close)
        whole = np.frombuffer(mm, dtype=np.uint8)        # keeps the mapping alive as long as a weight views it
        out = {}
        for name, (qtype, n, k, offset, nbytes) in index["weights"].items():
            data = pages.shared_view(whole[offset:offset + nbytes]).view(n, -1)
            # the page cache's pages mapped now, in one pass, not faulted in by the first steps; per matrix, as
            # MAP_POPULATE would also fill the holes between them with pages of zeros
            pages.advise(data.data_ptr(), nbytes, pages.MADV_POPULATE_READ)
            out[name] = GGUFWeight(qtype, data, (n, k))
        return out

    def writer(self, upper_bound: int) -> "EntryWriter | None":
        """A writer of this entry's matrices as they are repacked (each one's private copy freed once written, so a
        first start needs no more memory than one without the cache); None, with a warning, where the directory
        cannot take an entry of up to `upper_bound` bytes."""
        try:
            os.makedirs(self.root, exist_ok=True)
            self._remove_stale()
            usage = shutil.disk_usage(self.root)
            spare = max(SPARE, usage.total // 20)
            if usage.free < upper_bound + spare and not self._make_room(upper_bound + spare):
                logger.warning("repack cache: %.2f GiB free in %s, an entry may need %.2f GiB (+%.2f GiB kept free); "
                               "the repacked weights stay in private memory", shutil.disk_usage(self.root).free / 2**30,
                               self.root, upper_bound / 2**30, spare / 2**30)
                return None
            return EntryWriter(self)
        except OSError as e:
            logger.warning("repack cache: cannot write in %s (%s); the repacked weights stay in private memory",
                           self.root, e)
            return None

    def _remove_stale(self) -> None:
        """Entries of this GGUF path for another version of the file or the code (same rank), entries whose GGUF
        is gone, and temporary files of writers that died."""
        for entry in os.listdir(self.root):
            path = os.path.join(self.root, entry)
            try:
                if entry.endswith(".json") and not entry.startswith((".", self.prefix)):
                    with open(path) as f:
                        source = json.load(f).get("source")
                    if source and not os.path.exists(source):
                        logger.info("repack cache: removing %s (its GGUF %s is gone)", entry, source)
                        os.remove(path)
                        os.remove(path.removesuffix(".json") + ".bin")
                elif entry.startswith(".tmp-"):
                    pid = int(entry.split("-")[1])
                    if pid != os.getpid() and not _alive(pid):
                        os.remove(path)
                elif (entry.startswith(self.prefix) and not entry.startswith(self.name + ".")
                      and entry.rsplit(".", 1)[0].endswith("-" + self.rank)):
                    logger.info("repack cache: removing %s (made from another version of the file or of lmserve)",
                                entry)
                    os.remove(path)
            except (OSError, ValueError):
                continue


    def _make_room(self, need: int) -> bool:
        """Deletes other GGUFs' entries, used longest ago first, skipping those a process maps, until `need` bytes
        are free; whether they are."""
        entries = []
        for entry in os.listdir(self.root):
            if entry.endswith(".json") and not entry.startswith((".", self.prefix)):
                try:
                    entries.append((os.stat(os.path.join(self.root, entry)).st_mtime, entry))
                except OSError:
                    continue
        for _, entry in sorted(entries):
            if shutil.disk_usage(self.root).free >= need:
                break
            index = os.path.join(self.root, entry)
            try:
                with open(index.removesuffix(".json") + ".bin", "rb") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)   # BlockingIOError: a process maps it
                    os.remove(index)
                    os.remove(f.name)
                logger.info("repack cache: removing %s (used longest ago) to make room", entry)
            except OSError:
                continue
        return shutil.disk_usage(self.root).free >= need


class EntryWriter:
    """Appends repacked matrices to a temporary file; commit() makes it the entry and maps it. A write that fails
    (a disk filled meanwhile) stops the writing: the matrices written so far are read back into memory."""

    def __init__(self, cache: RepackCache):
        self.cache = cache
        self.tmp = os.path.join(cache.root, f".tmp-{os.getpid()}-{cache.name}")
        self.file = open(self.tmp + ".bin", "wb", buffering=0)    # unbuffered: what add() wrote is in the file
        self.layout: dict[str, tuple] = {}
        self.offset = 0             # the file's size: matrices and the holes that align them
        self.written = 0
        self.failed = False
        self.t0 = time.monotonic()

    def add(self, name: str, w: GGUFWeight) -> bool:
        """Write w (a repacked matrix); False when it was not written (keep it in memory then)."""
        if self.failed or w.qtype not in REPACKED:
            return False
        try:
            view, at = memoryview(w.data.contiguous().numpy()).cast("B"), self.offset
            while view:             # a write may take part of the bytes (a signal, a disk that fills)
                done = os.pwrite(self.file.fileno(), view, at)
                if done <= 0:
                    raise OSError(f"wrote {done} bytes")
                view, at = view[done:], at + done
        except OSError as e:
            logger.warning("repack cache: writing %s failed (%s); the repacked weights stay in private memory",
                           self.tmp + ".bin", e)
            self.failed = True
            return False
        self.layout[name] = (w.qtype, w.shape[0], w.shape[1], self.offset, w.nbytes)
        self.offset += -(-w.nbytes // ALIGN) * ALIGN
        self.written += w.nbytes
        return True

    def commit(self) -> dict[str, GGUFWeight]:
        """The written matrices, mapped from the written file (a thread makes it the entry once it is on disk), or
        read back into memory where the file could not be finished."""
        index = {"format": FORMAT, "source": self.cache.source, "bytes": self.offset, "weights": self.layout}
        if not self.layout:             # nothing to repack in this file (F16, odd shapes): no entry
            self._discard()
            return {}
        try:
            if self.failed:
                raise OSError("a write failed")
            self.file.truncate(self.offset)
            self.file.flush()
            mapped = self.cache._map(index, self.tmp + ".bin")
        except OSError as e:
            if not self.failed:
                logger.warning("repack cache: could not finish %s (%s); the repacked weights stay in private memory",
                               self.tmp + ".bin", e)
            out = self._read_back()
            self._discard()
            return out
        logger.info("repack cache: %.2f GiB written in %.1f s (with the repack), served from that file, shared with "
                    "other processes; it becomes the entry %s once on disk", self.written / 2**30,
                    time.monotonic() - self.t0, self.cache.bin)
        # NOTE: the fsync of a GiB-sized file takes seconds; the start does not wait for it. Renamed only after it, so
        # an entry is never a file a crash could have left half on disk.
        thread = threading.Thread(target=self._persist, args=(index,), name="repack-cache-fsync")
        _PENDING.append(thread)
        thread.start()
        return mapped

    def _persist(self, index: dict) -> None:
        try:
            os.fsync(self.file.fileno())
            with open(self.tmp + ".json", "w") as f:
                json.dump(index, f)
                f.flush()
                os.fsync(f.fileno())
            # the .bin first: an index names a whole .bin (a concurrent writer of this entry writes the same bytes)
            os.replace(self.tmp + ".bin", self.cache.bin)
            os.replace(self.tmp + ".json", self.cache.index)
            logger.info("repack cache: %s on disk (%.1f s after the start of its write)", self.cache.bin,
                        time.monotonic() - self.t0)
        except OSError as e:
            logger.warning("repack cache: could not make the entry %s (%s); this process serves its weights from "
                           "the unnamed file, the next start repacks again", self.cache.bin, e)
        finally:
            self._discard()

    def _discard(self) -> None:
        self.file.close()
        for suffix in (".bin", ".json"):
            if os.path.exists(self.tmp + suffix):
                os.remove(self.tmp + suffix)

    def _read_back(self) -> dict[str, GGUFWeight]:
        out = {}
        with open(self.tmp + ".bin", "rb") as f:
            for name, (qtype, n, k, offset, nbytes) in self.layout.items():
                f.seek(offset)
                data = torch.frombuffer(bytearray(f.read(nbytes)), dtype=torch.uint8).view(n, -1)
                out[name] = GGUFWeight(qtype, data, (n, k), owned=True)
        return out


_PENDING: list[threading.Thread] = []


def wait_for_writes() -> None:
    """Until this process's entries being written are on disk (or failed)."""
    while _PENDING:
        _PENDING.pop().join()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
