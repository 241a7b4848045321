"""PyTorch `.pth`/`.bin` state dicts (torch >= 1.6 zip format) read and written without torch,
one tensor at a time.

The file is a zip archive of stored (uncompressed) entries under one root folder (torch names it
after the file): `data.pkl` (see torch_pickle), `data/<key>` (one storage's raw bytes each),
`byteorder`, `version`, `.format_version`, `.storage_alignment`.

Reading maps the file and views each storage in place at its entry's data offset; a tensor is
copied out on read, and the pages it touched are handed back with madvise(MADV_DONTNEED), so
peak memory stays about one tensor whatever the file size (the page cache keeps the data).

Writing lays entries out exactly as torch's writer (miniz) does, which torch relies on when it
computes storage offsets itself (`calculate_storage_offsets`, meta-device loads): a local header
whose `FB` extra field pads the data to 64 bytes, the data, a data descriptor with its CRC-32
and sizes (zip64 fields past 4 GiB); storages first, as their tensors arrive (the state dict
keeps that order); data.pkl, the small records and the central directory once all are written.
"""

from __future__ import annotations

import mmap
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from llama_jax.convert.source import ConvertError
from llama_jax.convert.torch_pickle import STORAGE_NAMES, dump_state_dict, load_state_dict

FLOATS = {dt for dt in STORAGE_NAMES if dt.kind == "f" or dt.name == "bfloat16"}  # the tensor types read
ALIGNMENT = 64
BLOCK_BYTES = 64 * 2**20
U32 = 0xFFFFFFFF
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")


class TorchReader:
    def __init__(self, path: Path):
        self.path = path
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            with open(path, "rb") as f:
                legacy = f.read(1) == b"\x80"  # a bare pickle: torch < 1.6's format
            if legacy:
                raise ConvertError(f"{path} is in torch's pre-1.6 format; re-save it with a newer torch") from None
            raise ConvertError(f"{path} is truncated or not a torch checkpoint ({e})") from None
        with archive:
            self.entries = {info.filename: info for info in archive.infolist()}
            root = next(iter(self.entries), "").split("/")[0]
            if not root or any(not name.startswith(f"{root}/") for name in self.entries):
                raise ConvertError(f"{path} is not a torch checkpoint (no single root folder)")
            self.root = root
            if f"{root}/data.pkl" not in self.entries:
                raise ConvertError(f"{path} is not a torch checkpoint (no {root}/data.pkl)")
            byteorder = archive.read(f"{root}/byteorder").decode() if f"{root}/byteorder" in self.entries else "little"
            if byteorder != sys.byteorder:
                raise ConvertError(f"{path} holds {byteorder}-endian data; this machine is {sys.byteorder}-endian")
            pickled = archive.read(f"{root}/data.pkl")
        with open(path, "rb") as f:
            self.size = Path(path).stat().st_size
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.base = np.frombuffer(self.map, np.uint8).ctypes.data  # the mapping's address
        try:
            self.tensors = load_state_dict(pickled, self._storage)
        except ConvertError as e:
            raise ConvertError(f"{path}: {e}") from None
        for name, t in self.tensors.items():
            if t.dtype not in FLOATS:
                raise ConvertError(f"{path}: tensor {name} has unsupported dtype {t.dtype}")

    def _storage(self, dtype: np.dtype, key: str, numel: int) -> np.ndarray:
        """The 1-D array of storage `key`, viewed straight from the mapped file."""
        name = f"{self.root}/data/{key}"
        info = self.entries.get(name)
        if info is None:
            raise ConvertError(f"storage {key} has no entry {name}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ConvertError(f"entry {name} is compressed; torch checkpoints store their data uncompressed")
        start = info.header_offset
        head = self.map[start : start + LOCAL_HEADER.size]
        if len(head) < LOCAL_HEADER.size or LOCAL_HEADER.unpack(head)[0] != 0x04034B50:
            raise ConvertError(f"entry {name} has no local header (truncated?)")
        *_, name_len, extra_len = LOCAL_HEADER.unpack(head)
        offset = start + LOCAL_HEADER.size + name_len + extra_len
        nbytes = numel * dtype.itemsize
        if nbytes > info.file_size or offset + nbytes > self.size:
            raise ConvertError(f"storage {key} is truncated (it needs {nbytes} bytes, its entry has fewer)")
        return np.frombuffer(self.map, dtype, numel, offset)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name].dtype

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        out = np.array(t)
        if t.size:  # hand back the pages of the storage range the tensor spans
            first = t.ctypes.data - self.base
            last = first + sum((n - 1) * s for n, s in zip(t.shape, t.strides, strict=True)) + t.itemsize
            begin = first // mmap.PAGESIZE * mmap.PAGESIZE
            self.map.madvise(mmap.MADV_DONTNEED, begin, last - begin)
        return out


class TorchWriter:
    """Appends each tensor as it comes (in any order); close() writes the rest."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        for name, (_, dtype) in specs.items():
            if dtype not in STORAGE_NAMES:
                raise ConvertError(f"tensor {name}: torch files cannot hold dtype {dtype}")
        self.path, self.specs, self.todo = path, specs, dict(specs)
        self.root = path.stem  # torch.save names the root folder after the file, without its extension
        self.keys: dict[str, str] = {}
        self.central: list[bytes] = []
        self.file = open(path, "wb")  # noqa: SIM115 (closed in close())

    def _record(self, name: str, blocks, nbytes: int) -> None:
        """One stored entry: local header, data (from `blocks`), data descriptor."""
        offset, raw = self.file.tell(), f"{self.root}/{name}".encode()
        big = nbytes >= U32 or offset >= U32
        fields = (struct.pack("<QQ", nbytes, nbytes) if nbytes >= U32 else b"") + (
            struct.pack("<Q", offset) if offset >= U32 else b""
        )
        zip64 = struct.pack("<HH", 1, len(fields)) + fields if big else b""
        pad = -(offset + LOCAL_HEADER.size + len(raw) + len(zip64) + 4) % ALIGNMENT
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = 0x0808 if nbytes else 0x0800  # UTF-8 names; sizes in a data descriptor after the data
        self.file.write(LOCAL_HEADER.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(raw), len(extra)) + raw + extra)
        crc, written = 0, 0
        for block in blocks:
            crc, written = zlib.crc32(block, crc), written + len(block)
            self.file.write(block)
        assert written == nbytes, (name, written, nbytes)
        if nbytes:
            self.file.write(struct.pack("<IIQQ" if big else "<IIII", 0x08074B50, crc, nbytes, nbytes))
        # Central directory entry; zip64 values for what does not fit in 32 bits.
        fields = (struct.pack("<QQ", nbytes, nbytes) if nbytes >= U32 else b"") + (
            struct.pack("<Q", offset) if offset >= U32 else b""
        )
        cextra = struct.pack("<HH", 1, len(fields)) + fields if fields else b""
        size32, offset32 = min(nbytes, U32), min(offset, U32)
        self.central.append(
            CENTRAL_HEADER.pack(
                0x02014B50, 0, 0, flags, 0, 0, 0, crc, size32, size32, len(raw), len(cextra), 0, 0, 0, 0, offset32
            )
            + raw
            + cextra
        )

    def write(self, name: str, x: np.ndarray) -> None:
        """Write x in row blocks: a transposed view is made contiguous one block at a time."""
        shape, dtype = self.todo.pop(name)
        assert x.shape == tuple(shape) and x.dtype == dtype, (name, x.shape, x.dtype, shape, dtype)
        self.keys[name] = key = str(len(self.keys))
        rows = x.reshape(1) if x.ndim == 0 else x
        step = max(1, BLOCK_BYTES // max(1, rows[:1].nbytes))
        starts = range(0, len(rows), step)
        blocks = (np.ascontiguousarray(rows[i : i + step]).reshape(-1).view(np.uint8) for i in starts)
        self._record(f"data/{key}", blocks, x.nbytes)

    def close(self) -> None:
        assert not self.todo, f"{self.path}: tensors never written: {list(self.todo)}"
        # In the order written: torch's offset calculation expects the pickle to meet storages in file order.
        pickled = dump_state_dict([(n, tuple(self.specs[n][0]), self.specs[n][1], key) for n, key in self.keys.items()])
        small = {
            "data.pkl": pickled,
            ".format_version": b"1",
            ".storage_alignment": str(ALIGNMENT).encode(),
            "byteorder": sys.byteorder.encode(),
            "version": b"3\n",
        }
        for name, data in small.items():
            self._record(name, [data], len(data))
        start, directory = self.file.tell(), b"".join(self.central)
        n, end = len(self.central), start + len(directory)
        zip64_end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, len(directory), start)
        locator = struct.pack("<IIQI", 0x07064B50, 0, end, 1)
        eocd = struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(len(directory), U32), min(start, U32), 0
        )
        self.file.write(directory + zip64_end + locator + eocd)
        self.file.close()
