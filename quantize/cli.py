"""``codeserve quantize``: flags in, :func:`quantize.pipeline.run_ladder` does the work.

``server.cli`` registers the subcommand with :func:`add_parser`; :func:`main` runs it on its own
(``python -m quantize.cli SOURCE --out DIR``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantize.corpus import CORPORA
from quantize.ladder import LADDER, available_cores
from quantize.quality import EvalSettings

HELP = "build a model's Q2_K..Q8_0/F16 ladder and measure each rung's quality, size and speed"


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        type=Path,
        help="an F16/BF16/F32 GGUF, a quantized GGUF (with --rebuild-f16 or --force), "
        "or a Hugging Face checkpoint directory (needs torch and transformers)",
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the rungs and report.*")
    p.add_argument(
        "--types",
        help=f"comma-separated subset of {','.join(LADDER)} (default: all; F16 is always built: "
        "it is the reference)",
    )
    p.add_argument(
        "--rebuild-f16",
        action="store_true",
        help="for a quantized source: dequantize it to F16 with the gguf package first and "
        "quantize from that (the report labels the F16 as rebuilt)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="quantize an already quantized source as it is (quality loss compounds)",
    )
    p.add_argument("--corpus", choices=CORPORA, default="stdlib", help="code to score on")
    p.add_argument(
        "--corpus-tokens",
        type=_positive,
        default=2048,
        help="tokens scored per rung (default 2048)",
    )
    p.add_argument("--ctx", type=_positive, default=512, help="tokens per window (default 512)")
    p.add_argument("--speed-tokens", type=_positive, default=64, help="greedy tokens per run")
    p.add_argument("--speed-runs", type=_positive, default=3, help="decode runs (median)")
    p.add_argument("--threads", type=_positive, help="llama.cpp threads (default: all cores)")
    p.add_argument("--jobs", type=_positive, help="rungs quantized at once (default: cores)")
    p.add_argument(
        "--register",
        nargs="?",
        const="",
        type=str,
        metavar="MODELS_TOML",
        help="add every rung to this models.toml (default: the server's) as a named model",
    )
    p.add_argument(
        "--model-prefix",
        help="registered names are PREFIX-<type> (default: from the file name)",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _models_file(arg: str | None) -> Path | None:
    if arg is None:
        return None
    if arg:
        return Path(arg)
    from server.settings import StoreSettings

    return StoreSettings().models_file


def run(args: argparse.Namespace) -> dict:
    from quantize.pipeline import Options, run_ladder

    opts = Options(
        types=args.types,
        rebuild_f16=args.rebuild_f16,
        force=args.force,
        corpus=args.corpus,
        eval=EvalSettings(
            ctx=args.ctx,
            corpus_tokens=args.corpus_tokens,
            threads=args.threads or available_cores(),
            speed_tokens=args.speed_tokens,
            speed_runs=args.speed_runs,
        ),
        jobs=args.jobs,
        register=_models_file(args.register),
        model_prefix=args.model_prefix,
    )
    return run_ladder(args.source, args.out, opts, lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> None:
    from server.errors import CodeserveError

    p = argparse.ArgumentParser(prog="codeserve quantize", description=HELP)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except CodeserveError as e:
        print(f"codeserve: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
