"""The `data.pkl` of a torch state dict, read and written without torch (and without running it).

torch.save pickles a dict of tensors (protocol 2) whose only globals are `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` and the typed storage classes (`torch.BFloat16Storage`, ...);
each storage is a persistent id `("storage", <storage class>, key, location, numel)` naming the
archive member `data/<key>`. Reading allows exactly those globals (plus `_rebuild_parameter`, for
state dicts of `nn.Parameter`s) and refuses any other before it is called, so no code from the
file runs. Writing emits the same opcodes torch's pickler does, without importing torch.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

from llama_jax.convert.source import ConvertError

STORAGES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGES.items() if name != "UntypedStorage"}


class StorageType:
    """What `torch.<X>Storage` unpickles to here: only its element type matters."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> np.ndarray:
    """A strided view of a storage (a 1-D array), checked to stay inside it."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise ConvertError("a tensor is rebuilt from something other than a storage")
    parts = (offset, *size, *stride)
    if not all(isinstance(n, int) and n >= 0 for n in parts) or len(size) != len(stride):
        raise ConvertError(f"a tensor has an invalid offset, size or stride ({offset}, {size}, {stride})")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if math.prod(size) else offset - 1
    if last >= len(storage):
        raise ConvertError(f"a tensor of size {tuple(size)} at offset {offset} reaches past its storage")
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), strides, writeable=False)


def _rebuild_parameter(data, requires_grad=False, hooks=None) -> np.ndarray:
    return data


GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage: Callable[[np.dtype, str, int], np.ndarray]):
        super().__init__(io.BytesIO(data))
        self.storage, self.storages = storage, {}

    def find_class(self, module: str, name: str):
        if (module, name) not in GLOBALS:
            raise ConvertError(
                f"its pickle names {module}.{name}, which a state dict of tensors never needs; refused: loading it "
                "could run arbitrary code"
            )
        return GLOBALS[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ConvertError(f"its pickle has an unknown persistent id {str(pid)[:80]}")
        _, kind, key, _, numel = pid
        if not isinstance(kind, StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise ConvertError(f"its pickle has a malformed storage id {str(pid)[:80]}")
        if key not in self.storages:
            self.storages[key] = self.storage(kind.dtype, key, numel)
        return self.storages[key]


def load_state_dict(data: bytes, storage: Callable[[np.dtype, str, int], np.ndarray]) -> dict[str, np.ndarray]:
    """Unpickle a state dict; storage(dtype, key, numel) gives the 1-D array behind each key.
    Raises ConvertError (without the file's name) for anything but a flat dict of tensors."""
    try:
        state = _Unpickler(data, storage).load()
    except ConvertError:
        raise
    except Exception as e:  # a malformed pickle fails in many ways; none runs code from the file
        raise ConvertError(f"its pickle is malformed ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()
    ):
        raise ConvertError("it does not hold a flat state dict of tensors")
    return state


# -- writing -----------------------------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    if 0 <= n < 2**8:
        return b"K" + struct.pack("<B", n)
    if 0 <= n < 2**16:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + struct.pack("<B", len(raw)) + raw  # LONG1


def _tuple(items: Sequence[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t" if items else b")"


def dump_state_dict(tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, str]]) -> bytes:
    """The data.pkl of an OrderedDict of contiguous tensors, each (name, shape, dtype, storage key)
    with a storage of its own, as torch.save writes it (protocol 2, no memo)."""
    new_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    out = [b"\x80\x02", new_dict, b"("]
    for name, shape, dtype, key in tensors:
        numel = math.prod(shape)
        stride = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        storage = _tuple([_str("storage"), _global("torch", STORAGE_NAMES[dtype]), _str(key), _str("cpu"), _int(numel)])
        args = [storage + b"Q", _int(0), _tuple([_int(n) for n in shape]), _tuple([_int(s) for s in stride])]
        args += [b"\x89", new_dict]  # requires_grad=False, backward_hooks=OrderedDict()
        out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), _tuple(args), b"R"]
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)
