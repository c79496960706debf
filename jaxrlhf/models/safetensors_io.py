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


class CheckpointError(ValueError):
    """A missing, malformed or mismatched checkpoint file; one sentence for the user."""


def _read_header(file: str) -> tuple[dict, int]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short).")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file} has a corrupt safetensors header.") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Read tensors by name from a single-file or sharded (indexed) HF checkpoint directory."""

    def __init__(self, directory: str) -> None:
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
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
            for tensor, info in header.items():
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(
                        f"{file}: tensor {tensor!r} has unsupported dtype {info['dtype']}."
                    )
                start, end = info["data_offsets"]
                self._entries[tensor] = (
                    file,
                    _DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    base + start,
                    base + end,
                )

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

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
