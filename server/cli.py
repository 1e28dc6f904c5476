"""``codeserve``: one command, thin subcommands that parse flags and call the package."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.errors import CodeserveError, ConfigError
from server.registry import Registry, load_registry
from server.settings import ServerSettings
from server.store import ModelStore


def _settings(args: argparse.Namespace, fields: tuple[str, ...]) -> ServerSettings:
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return ServerSettings(**overrides)


def _registry(settings: ServerSettings) -> Registry:
    registry = load_registry(settings.models_file)
    if settings.model is not None and registry.get(settings.model) is None:
        raise ConfigError(
            f"--model / CODESERVE_MODEL names no model in {settings.models_file}: "
            f"{settings.model!r} (known: {', '.join(registry.models)})"
        )
    return registry


def cmd_serve(args: argparse.Namespace) -> None:
    from server import serving
    from server.api.app import create_app

    settings = _settings(
        args,
        (
            "host",
            "port",
            "api_key",
            "allow_unauthenticated_remote",
            "models_file",
            "cache_dir",
            "model",
            "queue_size",
            "queue_timeout_s",
            "memory_budget_mb",
            "log_level",
            "engine",
            "slots",
            "prefill_chunk",
        ),
    )
    registry = _registry(settings)
    app = create_app(settings, registry)
    model = settings.model or registry.default_model
    auth = "Bearer key required" if settings.api_key else "no API key"
    print(
        f"codeserve: serving {model!r} on http://{settings.host}:{settings.port}/v1 ({auth}); "
        f"GET /health says when the model is loaded",
        flush=True,
    )
    serving.run(app, settings)


def cmd_pull(args: argparse.Namespace) -> None:
    settings = _settings(args, ("models_file", "cache_dir"))
    registry = _registry(settings)
    store = ModelStore(registry, settings.cache_dir)
    names = args.names or [settings.model or registry.default_model]
    for name in names:
        cfg = registry.get(name)
        if cfg is None:
            raise ConfigError(f"no model named {name!r} (known: {', '.join(registry.models)})")
        path = store.pull(cfg)
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def cmd_models(args: argparse.Namespace) -> None:
    settings = _settings(args, ("models_file", "cache_dir"))
    registry = _registry(settings)
    store = ModelStore(registry, settings.cache_dir)
    rows = [("NAME", "SOURCE", "LOCAL PATH", "SIZE")]
    for name, cfg in registry.models.items():
        path = store.local_path(cfg)
        size = f"{path.stat().st_size / 2**20:.1f} MiB" if path else "-"
        marker = " *" if name == registry.default_model else ""
        rows.append((name + marker, store.describe_source(cfg), str(path or "not pulled"), size))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    print("\n* default model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codeserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--models-file", type=Path, help="registry (default: ./models.toml)")
        sp.add_argument("--cache-dir", type=Path, help="where fetched models are kept")

    s = sub.add_parser("serve", help="start the OpenAI-compatible server")
    common(s)
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int)
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    s.add_argument(
        "--allow-unauthenticated-remote",
        action="store_true",
        default=None,
        help="bind a non-loopback address without an API key",
    )
    s.add_argument("--model", help="the default model (overrides models.toml)")
    s.add_argument("--queue-size", type=int)
    s.add_argument("--queue-timeout-s", type=float)
    s.add_argument("--memory-budget-mb", type=int)
    s.add_argument(
        "--engine",
        choices=["auto", "simple", "batched"],
        help="batched (concurrent streams, n > 1) or simple (speculative decoding); auto: "
        "simple for models that speculate, batched otherwise",
    )
    s.add_argument("--slots", type=int, help="sequences the batched engine decodes together")
    s.add_argument("--prefill-chunk", type=int)
    s.add_argument("--log-level")
    s.set_defaults(func=cmd_serve)

    pl = sub.add_parser("pull", help="fetch models into the local cache")
    common(pl)
    pl.add_argument("names", nargs="*", help="model names (default: the default model)")
    pl.set_defaults(func=cmd_pull)

    m = sub.add_parser("models", help="list the registry and what is pulled")
    common(m)
    m.set_defaults(func=cmd_models)

    from bench.cli import add_parser as add_bench
    from quantize.cli import add_parser as add_quantize

    add_quantize(sub)
    add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per HTTP call would bury the benchmarks' progress bars.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ConfigError, CodeserveError) as e:
        print(f"codeserve: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
