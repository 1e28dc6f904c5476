"""Source -> F16 reference -> ladder -> quality -> report (-> models.toml), all or nothing.

Everything that can be checked without writing (the source file, the corpus, the names to
register) is checked before the output directory is touched. If a later step fails, the files
this run wrote are removed again (and the directory, if this run created it and it is empty).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantize import convert, registry
from quantize.corpus import load_corpus
from quantize.errors import QuantizeError
from quantize.ladder import REFERENCE, build_ladder, parse_types, rung_path
from quantize.quality import EvalSettings, evaluate
from quantize.report import Provenance, to_dict, write_report
from quantize.source import info_from_reader, model_stem, read_gguf, rebuild_f16


@dataclass(frozen=True)
class Options:
    types: str | None = None
    rebuild_f16: bool = False
    force: bool = False
    corpus: str = "stdlib"
    eval: EvalSettings = field(default_factory=EvalSettings)
    jobs: int | None = None
    register: Path | None = None
    model_prefix: str | None = None


def refusal(path: Path, file_type: str) -> QuantizeError:
    return QuantizeError(
        f"{path} is already quantized ({file_type}). Quantizing it again compounds two "
        f"roundings, so every rung would be {file_type}'s error plus its own and the ladder would "
        "not measure what its names say. Start from an F16/BF16/F32 GGUF or a Hugging Face "
        f"checkpoint. Otherwise pass --rebuild-f16 to dequantize it to an F16 first (the report "
        f"labels that reference as rebuilt from {file_type}), or --force to quantize it as it is."
    )


def _prepare(source: Path, out: Path, stem: str, opts: Options, progress, reader):
    """The file the ladder is quantized from, prebuilt rungs, and the reference's provenance."""
    f16 = rung_path(out, stem, REFERENCE)
    if reader is None:  # a Hugging Face checkpoint directory
        convert.convert_hf(source, f16, progress=progress)
        prov = Provenance(
            source=source,
            source_type="Hugging Face checkpoint",
            reference="F16 converted by llama.cpp's convert_hf_to_gguf.py",
            rebuilt_from=None,
            requantized=False,
        )
        return f16, {REFERENCE: f16}, prov, [f16]
    info = info_from_reader(source, reader)
    if info.quantized and opts.rebuild_f16:
        built = rebuild_f16(source, f16, progress, reader=reader)
        prov = Provenance(
            source=source,
            source_type=info.file_type,
            reference=f"F16 rebuilt from {info.file_type} by dequantizing with the gguf package",
            rebuilt_from=built.rebuilt_from,
            requantized=False,
        )
        return f16, {REFERENCE: f16}, prov, [f16]
    if info.quantized:  # --force
        prov = Provenance(
            source=source,
            source_type=info.file_type,
            reference=f"F16 dequantized by llama.cpp from the {info.file_type} source",
            rebuilt_from=info.file_type,
            requantized=True,
        )
        return source, {}, prov, []
    same = source.resolve() == f16.resolve()
    reference = (
        "the source itself"
        if same
        else f"F16 written by llama.cpp from the {info.file_type} source"
    )
    prov = Provenance(source, info.file_type, reference, info.rebuilt_from, False)
    return source, ({REFERENCE: f16} if same else {}), prov, []


def run_ladder(
    source: Path, out: Path, opts: Options, progress: Callable[[str], None] = print
) -> dict:
    """Build and measure the ladder of ``source`` into ``out``; returns the report dict."""
    start = time.perf_counter()
    types = parse_types(opts.types)
    corpus = load_corpus(opts.corpus)
    reader = None
    if source.is_dir():
        convert.check_ready(source)
    else:
        reader = read_gguf(source)
        info = info_from_reader(source, reader)
        if info.quantized and not (opts.force or opts.rebuild_f16):
            raise refusal(source, info.file_type)
    stem = model_stem(source)
    names = registry.model_names(stem, types, opts.model_prefix)
    if opts.register is not None:
        registry.check_names(opts.register, stem, list(names.values()))

    if out.exists() and not out.is_dir():
        raise QuantizeError(f"--out {out}: exists and is not a directory")
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        src, prebuilt, prov, written = _prepare(source, out, stem, opts, progress, reader)
        rungs = build_ladder(
            src,
            out,
            stem,
            types,
            requantize=prov.requantized,
            prebuilt=prebuilt,
            jobs=opts.jobs,
            progress=progress,
        )
        written += [r.path for r in rungs if r.built]
        quality, meta = evaluate(rungs, corpus, opts.eval, progress)
        report = to_dict(stem, prov, rungs, quality, meta, time.perf_counter() - start)
        paths = write_report(out, report)
        written += paths.values()
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        if created_out and not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    progress(f"report: {paths['md']} ({report['wall_s']:.0f} s)")
    if opts.register is not None:
        lineage = f", rebuilt from {prov.rebuilt_from}" if prov.rebuilt_from else ""
        entries = [
            (
                names[row["type"]],
                out / row["file"],
                f"{stem} {row['type']} (codeserve quantize{lineage}): "
                f"{row['size_bytes'] / 2**20:.1f} MiB, KLD {row['kld_mean']:.4f} vs F16",
            )
            for row in report["rungs"]
        ]
        registry.register(opts.register, stem, entries)
        progress(f"registered in {opts.register}: {', '.join(n for n, _, _ in entries)}")
    return report
