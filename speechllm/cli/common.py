"""What the command modules share: messages, the --config/KEY=VALUE options, flags derived from a
config section's dataclass fields, and the model a command loads.

Nothing here imports torch at module level: `speechllm --help` builds every parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from ..config import Config, field_docs, load_config


def fail(msg: str) -> int:
    """Print `msg` as the command's error; returns the exit status (2)."""
    print(f"speechllm: error: {msg}", file=sys.stderr)
    return 2


def info(msg: str) -> None:
    """A progress or status line on stderr."""
    print(f"[speechllm] {msg}", file=sys.stderr, flush=True)


def output_file_problem(out: str | Path, source: str | Path | None = None) -> str | None:
    """Why `--out` cannot be the JSONL file a command appends to (it is the input `source`, a
    folder, or under a file), None when it can."""
    from ..io.paths import folder_problem, same_file

    out = Path(out)
    if source is not None and Path(source).is_file() and same_file(out, source):
        return f"--out {out} is the input file; write to another file"
    if out.is_dir():
        return f"--out {out} is a folder; name the .jsonl file to write"
    problem = folder_problem(out.parent)
    return f"--out {out}: {problem}" if problem else None


def new_parser(sub, name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows `description` and the `examples`."""
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))


def add_config_args(p: argparse.ArgumentParser, what: str = "config") -> None:
    """`--config YAML` and trailing `KEY=VALUE` overrides of any config key."""
    p.add_argument("--config", metavar="YAML", help=f"{what} (default: the embedded default, configs/default.yaml)")
    add_overrides(p)


def add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    """`--device` and `--quiet`."""
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- flags from fields

def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the annotation without `| None`, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def add_section_flags(p: argparse.ArgumentParser, section: str, choices: dict[str, list[str]] | None = None,
                      metavars: dict[str, str] | None = None, repeated: dict[str, str] | None = None) -> None:
    """One `--field-name` flag per field of `Config.<section>`, typed from its annotation, its
    help from the field's docstring and default. A flag that is not given leaves the config
    (defaults, --config, KEY=VALUE) as it is; a given one overrides `section.field`. `repeated`
    names list fields given one item per flag instead (field -> flag name, e.g. classifiers ->
    classifier: `--classifier a=X --classifier b=Y`)."""
    cls = typing.get_type_hints(Config)[section]
    docs, defaults = field_docs(cls), cls()
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(typing.get_type_hints(cls)[f.name])
        default = getattr(defaults, f.name)
        shown = "" if default is None or default == [] else f" (default: {_show(default)})"
        kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": (docs.get(f.name, "") + shown).replace("%", "%%")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(tp)
            if origin is list and repeated and f.name in repeated:
                kwargs["action"] = "append"
                tp = typing.get_args(tp)[0]
            elif origin is list:
                kwargs["nargs"] = "+"
                tp = typing.get_args(tp)[0]
            if typing.get_origin(tp) is Literal:
                kwargs["choices"] = list(typing.get_args(tp))
            elif choices and f.name in choices:
                kwargs["choices"] = choices[f.name]
            else:
                kwargs["type"] = tp
                kwargs["metavar"] = (metavars or {}).get(f.name, "N" if tp in (int, float) else f.name.upper())
        p.add_argument("--" + (repeated or {}).get(f.name, f.name).replace("_", "-"), **kwargs)


OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")
"""A `section.key=value` config override."""


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def section_updates(args: argparse.Namespace) -> dict:
    """The section flags given on the command line, as a nested config dict; list values may
    also be comma-separated (`--annotators duration,vad`). A KEY=VALUE override that a list flag
    swallowed (`--tasks gender eval.seed=3`) goes back to the overrides."""
    tree: dict = {}
    for key, value in vars(args).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        if isinstance(value, list):
            swallowed = [v for v in value if OVERRIDE.match(str(v))]
            if swallowed and hasattr(args, "overrides"):
                args.overrides = [*args.overrides, *swallowed]
            value = [part.strip() for v in value if v not in swallowed for part in str(v).split(",") if part.strip()]
        tree.setdefault(section, {})[name] = value
    return tree


def config_from_args(args: argparse.Namespace) -> Config:
    """The config a command runs with: defaults, then --config, then KEY=VALUE, then flags."""
    updates = section_updates(args)
    return load_config(getattr(args, "config", None), getattr(args, "overrides", None), updates)


# ----------------------------------------------------------------------------- models

def add_model_source(p: argparse.ArgumentParser) -> None:
    """`--checkpoint DIR` or `--untrained`, and `--config` for the untrained one (chat, serve)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a trained adapter folder (from `speechllm train`)")
    src.add_argument("--untrained", action="store_true",
                     help="a freshly initialised adapter on the configured base models (smoke test)")
    p.add_argument("--config", metavar="YAML",
                   help="model config for --untrained (default: the embedded default, as in configs/default.yaml)")


def add_overrides(p: argparse.ArgumentParser) -> None:
    """Trailing `KEY=VALUE` config overrides (after any positional argument of the command)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. generation.max_new_tokens=64 (any key of configs/default.yaml)")


def load_model(args: argparse.Namespace):
    """The model that `add_model_source`'s options name, in eval mode, and the config its
    generation settings come from (`args.overrides` and section flags applied). Raises
    ConfigError for --config with a checkpoint (a checkpoint carries its own model config)."""
    import torch

    from ..config import ConfigError
    from ..model import SpeechLLM, build_model

    if args.checkpoint:
        if args.config:
            raise ConfigError("--config applies to --untrained; a checkpoint carries its own model config")
        updates = section_updates(args)
        cfg = load_config(None, args.overrides, updates)
        # custom model code only if the user asks here, never because the checkpoint says so
        model = SpeechLLM.from_pretrained(args.checkpoint, device=args.device,
                                          trust_remote_code=cfg.model.llm.trust_remote_code).merge_lora()
    else:
        cfg = config_from_args(args)
        torch.manual_seed(cfg.generation.seed)  # the untrained adapter is the same on every run
        model = build_model(cfg, device=args.device)
    return model.eval(), cfg
