"""llama.cpp's own quantization types (k-quants and Q8_0) of our float model, scored in llama.cpp.

The float model is the GGUF source with every tensor dequantized to F32 (the same numbers our
float safetensors copy holds), written once next to the other cached models. llama.cpp's
`llama_model_quantize` requantizes it to each type with its own per-tensor mix (Q4_K_M keeps some
tensors at Q6_K, and rows whose length is not a multiple of 256 fall back to a legacy type); the
token embedding and output head stay F32, as in every other row. llama.cpp then scores the same
token windows as `quept_core.eval.perplexity` (`quept_core.io.llamacpp.window_nll`).

Bits per weight count the bytes of the decoder-block linears in the quantized file, scales and
minimums included, over their parameters: the same tensors `storage_bits` counts for our rows.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quept_core.io.llamacpp import load_llama, window_nll

log = logging.getLogger(__name__)

# method -> llama.cpp file type (enum llama_ftype)
KQUANT_TYPES: dict[str, int] = {
    "llamacpp-q3_k_s": 11,
    "llamacpp-q3_k_m": 12,
    "llamacpp-q4_k_m": 15,
    "llamacpp-q5_k_m": 17,
    "llamacpp-q6_k": 18,
    "llamacpp-q8_0": 7,
}
FLOAT_METHOD = "llamacpp-f32"  # the float GGUF in llama.cpp: checks its scoring against our fp row
GGML_TYPE_F32 = 0
# The source weights were Q4_1 (4 bits, groups of 32, float minimum): these types can represent them.
REPRODUCES_SOURCE = ("llamacpp-q4_k_m", "llamacpp-q5_k_m", "llamacpp-q6_k", "llamacpp-q8_0")
SOURCE_NOTE = "grid can reproduce the original Q4_1 weights"
# GGUF names of the decoder-block linears (blk.<i>.<name>.weight).
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def precision_label(method: str) -> str:
    """The row's precision: the llama.cpp type, e.g. `q4_k_m`."""
    return method.removeprefix("llamacpp-")


def write_float_gguf(source: Path, target: Path) -> None:
    """`source` with every tensor dequantized to F32 and its metadata kept (file type set to F32)."""
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = reader.fields["general.architecture"].contents()
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape(tuple(reversed(tensor.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)


def quantize_gguf(float_gguf: Path, target: Path, file_type: int, threads: int | None = None) -> None:
    """llama.cpp's quantization of `float_gguf` to `file_type`, embedding and output head kept F32."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = threads or torch.get_num_threads()
    params.token_embedding_type = GGML_TYPE_F32
    params.output_tensor_type = GGML_TYPE_F32
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    status = llama_cpp.llama_model_quantize(str(float_gguf).encode(), str(partial).encode(), params)
    if status != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {float_gguf} to file type {file_type} "
                           f"(status {status})")
    os.replace(partial, target)


@dataclass(frozen=True)
class LinearBits:
    bits_per_weight: float  # bytes of the block linears x 8 / their parameters
    types: dict[str, int]  # ggml type name -> how many block linears use it


def block_linear_bits(path: Path) -> LinearBits:
    import gguf

    total_bytes = total_params = 0
    types: collections.Counter[str] = collections.Counter()
    for tensor in gguf.GGUFReader(path).tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and parts[2] in BLOCK_LINEARS:
            total_bytes += int(tensor.n_bytes)
            total_params += int(tensor.n_elements)
            types[tensor.tensor_type.name.lower()] += 1
    return LinearBits(8 * total_bytes / total_params, dict(types.most_common()))


class KQuantFiles:
    """The float GGUF and its llama.cpp requantizations, each written once into `folder`."""

    def __init__(self, source: Path, folder: Path):
        self.source = source
        self.folder = folder

    def float_gguf(self) -> Path:
        path = self.folder / f"{self.source.stem}-f32.gguf"
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            log.info("writing the float GGUF %s (first use only)", path)
            write_float_gguf(self.source, path)
        return path

    def path(self, method: str) -> Path:
        if method == FLOAT_METHOD:
            return self.float_gguf()
        path = self.folder / f"{self.source.stem}-{precision_label(method)}.gguf"
        if not path.is_file():
            quantize_gguf(self.float_gguf(), path, KQUANT_TYPES[method])
        return path


def llamacpp_window_nll(path: Path, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window [n, T] by llama.cpp on the GGUF file at `path`."""
    return window_nll(load_llama(path, n_ctx=windows.shape[1], logits_all=True), windows)
