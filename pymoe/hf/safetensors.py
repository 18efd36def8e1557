"""Read safetensors files with NumPy alone, bfloat16 included.

The format (huggingface/safetensors, README "Format"): 8 bytes little-endian u64 N, N bytes of
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian bytes, offsets relative to the end of the header. A tensor is read
only when asked for, so loading one layer of a 100 GB checkpoint reads that layer's bytes.
bfloat16 is the top half of a float32: widening it is a 16-bit shift, exact.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?", "BF16": "<u2"}
_HEADER_LIMIT = 100 << 20  # the format's own cap on the header size


class SafetensorsFile:
    """One .safetensors file: `names()`, `dtype(name)` and `read(name) -> np.ndarray`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"path: {self.path} is not a safetensors file (shorter than "
                                 "its 8-byte header size)")
            n = int.from_bytes(raw, "little")
            if n > _HEADER_LIMIT:
                raise ValueError(f"path: {self.path} is not a safetensors file (header size "
                                 f"{n} bytes)")
            try:
                header: dict[str, Any] = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"path: {self.path} is not a safetensors file (its header is "
                                 f"not JSON: {err})") from err
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n

    def names(self) -> list[str]:
        return list(self._header)

    def dtype(self, name: str) -> str:
        """The stored dtype code: F32, F16, BF16, ..."""
        return str(self._header[name]["dtype"])

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a native-order array; BF16 and F16 widen to float32 (NumPy has no
        bfloat16, and float16 expert math is not what a checkpoint's user runs)."""
        entry = self._header[name]
        code, shape = entry["dtype"], tuple(entry["shape"])
        if code not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {code}, which pymoe does "
                             f"not read ({', '.join(sorted(_DTYPES))})")
        begin, end = entry["data_offsets"]
        dt = np.dtype(_DTYPES[code])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dt.itemsize:
            raise ValueError(f"{self.path}: tensor {name!r} holds {end - begin} bytes, its shape "
                             f"{shape} and dtype {code} need {count * dt.itemsize}")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = np.fromfile(f, dtype=dt, count=count)
        if data.size != count:
            raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        data = data.reshape(shape)
        if code == "BF16":
            return bfloat16_to_float32(data)
        if code == "F16":
            return data.astype(np.float32)
        return data.astype(dt.newbyteorder("="), copy=False)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bfloat16 is float32's upper 16 bits)."""
    return (bits.astype("<u4") << 16).astype(np.uint32).view(np.float32)


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounded to nearest even (as torch rounds)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    nan = np.isnan(x)
    return np.where(nan, (u >> 16) | 0x40, rounded >> 16).astype(np.uint16)


def save(path: str | os.PathLike, tensors: dict[str, np.ndarray], *,
         bfloat16: bool = False) -> None:
    """Write tensors as one safetensors file (float32/float64/float16, or bfloat16 bit patterns
    when bfloat16=True: float arrays rounded to nearest even). For tests and examples."""
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    codes = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
             np.dtype("<i8"): "I64", np.dtype("<i4"): "I32"}
    for name, arr in tensors.items():
        a = np.asarray(arr)
        if bfloat16 and a.dtype.kind == "f":
            blob, code = float32_to_bfloat16(a.astype(np.float32)).astype("<u2").tobytes(), "BF16"
        else:
            le = a.astype(a.dtype.newbyteorder("<"), copy=False)
            if le.dtype not in codes:
                raise TypeError(f"tensors[{name!r}]: dtype {a.dtype} is not written")
            blob, code = np.ascontiguousarray(le).tobytes(), codes[le.dtype]
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for blob in blobs:
            f.write(blob)
