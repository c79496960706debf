"""Minimal streaming safetensors reader and writer (bfloat16 included, via ml_dtypes).

The reader memory-maps each file and hands out zero-copy views, so a loader can slice one
tensor at a time into device shards without materialising the checkpoint. The writer computes
the header from shapes up front and then streams tensors one by one.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from jaxrlhf.errors import DataError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(DataError):
    """A missing, malformed or mismatched checkpoint file; one sentence for the user."""


def _read_header(file: str) -> tuple[dict, int]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short).")
        (size,) = struct.unpack("<Q", raw)
        if size > os.path.getsize(file) - 8:  # e.g. a pickle or zip renamed .safetensors
            raise CheckpointError(
                f"{file} is not a safetensors file (its header length {size} exceeds the file); "
                "expected a file written by safetensors (re-download or re-export it)."
            )
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{file} has a corrupt safetensors header; expected a file written by "
            "safetensors (re-download or re-export it)."
        )
    header.pop("__metadata__", None)
    return header, 8 + size


def _entry_of(file: str, tensor: str, info: object, base: int, file_size: int) -> tuple:
    """``(file, dtype, shape, start, end)`` of one header entry, checked against the data its
    dtype and shape need and against the file's size (a truncated download fails here, naming
    the file and the tensor, instead of in a reshape)."""
    try:
        code, shape = info["dtype"], tuple(int(n) for n in info["shape"])  # type: ignore[index]
        start, end = (int(n) for n in info["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(
            f"{file}: the header entry of tensor {tensor!r} is malformed ({info!r}); expected "
            "dtype, shape and data_offsets."
        ) from None
    if code not in _DTYPES:
        raise CheckpointError(f"{file}: tensor {tensor!r} has unsupported dtype {code}.")
    dtype = _DTYPES[code]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - start != nbytes or start < 0:
        raise CheckpointError(
            f"{file}: tensor {tensor!r} spans bytes {start}..{end} of the data, but its shape "
            f"{shape} in {code} needs {nbytes} bytes; the file is corrupt."
        )
    if base + end > file_size:
        raise CheckpointError(
            f"{file} is truncated: tensor {tensor!r} ends at byte {base + end} but the file has "
            f"{file_size} bytes; re-download or re-export it."
        )
    return file, dtype, shape, base + start, base + end


class SafetensorsReader:
    """Read tensors by name from a single-file or sharded (indexed) HF checkpoint directory."""

    def __init__(self, directory: str) -> None:
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(
                    f"{index} is not a safetensors index; expected JSON with a "
                    "'weight_map' of tensor name -> file."
                ) from None
        elif os.path.isfile(single):
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; expected HF "
                "safetensors weights."
            )
        self.directory = directory
        self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int, int]] = {}
        self._maps: dict[str, np.memmap] = {}
        for name in files:
            file = os.path.join(directory, name)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is listed in {INDEX_FILE} but does not exist.")
            header, base = _read_header(file)
            size = os.path.getsize(file)
            for tensor, info in header.items():
                self._entries[tensor] = _entry_of(file, tensor, info, base, size)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def file(self, name: str) -> str:
        """The file that holds tensor ``name``."""
        return self._entry(name)[0]

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.directory}."
            ) from None

    def get(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of tensor ``name``."""
        file, dtype, shape, start, end = self._entry(name)
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        raw = self._maps[file][start:end]
        return raw.view(dtype).reshape(shape)


def write_safetensors(
    file: str,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
) -> None:
    """Write ``(name, shape, dtype, produce)`` entries, producing each tensor as it is written."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tensors:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {array.shape}, expected {tuple(shape)}."
                )
            f.write(array.tobytes())
