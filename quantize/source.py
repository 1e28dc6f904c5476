"""Source GGUFs: what they hold (checked before llama.cpp sees them) and F16 rebuilds.

llama.cpp aborts or prints cryptic errors on a truncated or corrupt file, so every source is read
with ``gguf.GGUFReader`` first, which fails in Python with a message we can rephrase.

A quantized GGUF can be turned back into an F16 one by dequantizing every tensor with the
``gguf`` package. That does not recover the original weights (the rounding of the first
quantization stays), so the rebuilt file says so in its metadata under ``codeserve.rebuilt_from``
and llama.cpp copies that key into every rung quantized from it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from quantize.errors import QuantizeError

REBUILT_FROM_KEY = "codeserve.rebuilt_from"
UNQUANTIZED_TYPES = ("F32", "F16", "BF16")
_F16_MAX = float(np.finfo(np.float16).max)
_TYPE_SUFFIX = re.compile(
    r"[._-](f32|f16|bf16|q\d(_[0-9a-z]+)*|iq\d(_[0-9a-z]+)*|tq\d_\d)$", re.IGNORECASE
)


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    arch: str
    name: str
    file_type: str  # llama.cpp's name without MOSTLY_: "Q4_1", "F16", "F32", ...
    quantized: bool  # judged from the tensors, not the (sometimes missing) file_type label
    n_tensors: int
    n_params: int
    rebuilt_from: str | None


def read_gguf(path: Path):
    """Open ``path`` with ``gguf.GGUFReader``; any damage becomes a QuantizeError."""
    import gguf

    if not path.is_file():
        raise QuantizeError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise QuantizeError(
            f"{path}: not a readable GGUF file ({size} bytes): {e}. It is truncated, corrupt or "
            "not a GGUF at all; fetch it again."
        ) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise QuantizeError(
            f"{path}: truncated: its tensors need {end} bytes but the file has {size}; "
            "fetch it again."
        )
    if not reader.tensors:
        raise QuantizeError(f"{path}: a GGUF with no tensors (vocab-only?) has nothing to quantize")
    return reader


def _field(reader, key: str):
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def _tensor_type_names(reader) -> list[str]:
    return [t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2]


def _file_type_name(reader) -> str:
    import gguf

    value = _field(reader, "general.file_type")
    if value is not None:
        try:
            name = gguf.LlamaFileType(int(value)).name
        except ValueError:
            return f"file_type {value}"
        return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    # Older converters left the label out: name the file after its commonest matrix type.
    types = _tensor_type_names(reader)
    return Counter(types).most_common(1)[0][0] if types else "F32"


def info_from_reader(path: Path, reader) -> GGUFInfo:
    return GGUFInfo(
        path=path,
        arch=str(_field(reader, "general.architecture") or "?"),
        name=str(_field(reader, "general.name") or ""),
        file_type=_file_type_name(reader),
        quantized=any(t not in UNQUANTIZED_TYPES for t in _tensor_type_names(reader)),
        n_tensors=len(reader.tensors),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        rebuilt_from=_field(reader, REBUILT_FROM_KEY),
    )


def inspect_gguf(path: Path) -> GGUFInfo:
    return info_from_reader(path, read_gguf(path))


def model_stem(path: Path) -> str:
    """Rung file prefix: ``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``."""
    stem = path.name.removesuffix(".gguf")
    return _TYPE_SUFFIX.sub("", stem) or stem


def rebuild_f16(
    src: Path, dst: Path, progress: Callable[[str], None] = print, reader=None
) -> GGUFInfo:
    """Dequantize every quantized tensor of ``src`` to F16 and write ``dst`` atomically.

    Metadata is copied as is, except ``general.file_type`` (now MOSTLY_F16) and
    ``codeserve.rebuilt_from`` (the source's type, kept if the source was itself rebuilt).
    """
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType as V

    reader = reader if reader is not None else read_gguf(src)
    info = info_from_reader(src, reader)
    progress(f"rebuild: dequantizing {src.name} ({info.file_type}) to F16 with the gguf package")
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, info.arch)
    alignment = _field(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)
    for field in reader.fields.values():
        # The writer emits the GGUF.* header fields and the architecture itself.
        if field.name.startswith("GGUF.") or field.name in (
            "general.architecture",
            "general.file_type",
            REBUILT_FROM_KEY,
        ):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == V.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_key_value("general.file_type", int(gguf.LlamaFileType.MOSTLY_F16), V.UINT32)
    writer.add_key_value(REBUILT_FROM_KEY, info.rebuilt_from or info.file_type, V.STRING)

    plan = []
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims innermost first
        # 1-D tensors (norms, biases) stay F32 as llama.cpp's converter writes them.
        keep_f32 = t.tensor_type == T.F32 or len(shape) == 1
        dtype = np.dtype(np.float32 if keep_f32 else np.float16)
        writer.add_tensor_info(t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        plan.append((t, dtype))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, dtype in plan:
            try:
                values = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise QuantizeError(f"{src}: cannot dequantize {t.name}: {e}") from None
            if dtype == np.float16 and np.abs(values).max(initial=0.0) > _F16_MAX:
                raise QuantizeError(f"{src}: {t.name} has values beyond the F16 range")
            writer.write_tensor_data(np.ascontiguousarray(values, dtype=dtype))
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    progress(f"rebuild: wrote {dst.name} ({dst.stat().st_size / 2**20:.1f} MiB)")
    return replace(
        info,
        path=dst,
        file_type="F16",
        quantized=False,
        rebuilt_from=info.rebuilt_from or info.file_type,
    )
