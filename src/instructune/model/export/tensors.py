"""Weights in the GGUF storage types: f32, f16, or q8_0 (8-bit blocks of 32 with an f16 scale each).

Norms and other 1-D weights always stay f32 (llama.cpp computes them in f32 and they are tiny). In
q8_0 a matrix whose rows are not a whole number of 32-weight blocks is stored in f16 instead, as
llama.cpp's own converter does. Quantisation is `gguf.quants`, the reference implementation that
ships with llama.cpp's Python package.
"""

from __future__ import annotations

import gguf
import numpy as np

FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
"""The `general.file_type` each export type records."""


def storage_type(shape: tuple[int, ...], kind: str) -> gguf.GGMLQuantizationType:
    """The GGML type a weight of this shape is stored in, for export type `kind`."""
    if kind == "f32" or len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if kind == "q8_0":
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
        if shape[-1] % block == 0:
            return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def encode(weight: np.ndarray, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float32 weight as the array `GGUFWriter.add_tensor` takes, and its GGML type."""
    qtype = storage_type(weight.shape, kind)
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(weight, dtype=np.float32), qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(weight, dtype=np.float16), qtype
    return gguf.quants.quantize(np.ascontiguousarray(weight, dtype=np.float32), qtype), qtype
