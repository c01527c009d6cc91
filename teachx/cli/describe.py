"""Text for `teachx config --describe / --list`, `teachx teachers` and `teachx models`.

Descriptions come from the code (see :mod:`teachx.utils.docs`), so they cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from typing import Any, Iterator, Optional

import yaml

from teachx.config.loader import to_dict
from teachx.config.schema import MethodConfig, RunConfig
from teachx.utils.docs import Option, callable_options, option_docs, summary

COMMENT_COLUMN = 34  # descriptions start here unless the key and value are longer


def value_text(value: Any) -> str:
    """A value as it is written in YAML (and on the command line): null, true, 0.001, [a, b], {}."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    except yaml.YAMLError:
        return repr(value)
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text[:-4] if text.endswith(" ...") else text


def _commented(line: str, help_text: str) -> str:
    return f"{line:<{COMMENT_COLUMN}}  # {help_text}" if help_text else line


def _section_lines(obj: Any, indent: str) -> Iterator[str]:
    docs = option_docs(type(obj))
    helps = _method_option_helps(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield f"{indent}{f.name}:"
            yield from _section_lines(value, indent + "  ")
        elif f.name == "options" and helps and value:  # a method's options, one a line with its meaning
            yield _commented(f"{indent}{f.name}:", docs.get(f.name, ""))
            for key, option in value.items():
                yield _commented(f"{indent}  {key}: {value_text(option)}", helps.get(key, ""))
        else:
            yield _commented(f"{indent}{f.name}: {value_text(value)}", docs.get(f.name, ""))


def _method_option_helps(obj: Any) -> dict[str, str]:
    """What each option of the method section ``obj`` means, for a method with typed options (IMPACTX's, which
    the config states one by one); {} for any other section or method."""
    if not isinstance(obj, MethodConfig):
        return {}
    from teachx.training.methods import METHODS  # lazy: CLI start-up

    method = METHODS.get(obj.name) if obj.name in METHODS else None
    if method is None or method.options_type is None:
        return {}
    return {key: option.help for key, option in method.options.items()}


def describe_config(cfg: Any, study: Optional[dict[str, Any]] = None) -> str:
    """The resolved run config as YAML, every option with its description as a comment; then the
    ``study:`` section: ``study`` (a resolved section, :meth:`StudySpec.section`) with each key's
    value and meaning, else the keys of `teachx study` configs, commented out."""
    from teachx.studies.spec import STUDY_KEYS, EvalSpec  # lazy: CLI start-up

    lines = [
        "# every option of a teachx config, its value here and what it means;",
        "# a file with any subset of these keys is a config (`teachx run FILE`), KEY=VALUE overrides one",
        *_section_lines(cfg, ""),
        "",
    ]
    if study is None:
        lines += ["# `teachx study` configs add a study: section (seeds x arms x regimes, paired tests):", "# study:"]
    else:
        lines += [
            "# the study: section of this `teachx study` config (seeds x arms x regimes, paired tests), resolved:",
            "study:",
        ]
    mark = "# " if study is None else ""
    eval_docs = option_docs(EvalSpec)
    for key, help_text in STUDY_KEYS.items():
        if study is not None and key not in study:
            continue  # n_seeds: resolved into seeds
        if key == "eval":
            lines.append(_commented(f"{mark}  eval:", help_text))
            values = (study or {}).get("eval") or dataclasses.asdict(EvalSpec())
            for f in dataclasses.fields(EvalSpec):
                lines.append(_commented(f"{mark}    {f.name}: {value_text(values[f.name])}", eval_docs.get(f.name, "")))
        elif study is not None and isinstance(study[key], dict) and study[key]:  # arms, regimes, ...: one entry a line
            lines.append(_commented(f"  {key}:", help_text))
            lines += [f"    {value_text(name)}: {value_text(value)}" for name, value in study[key].items()]
        else:
            lines.append(_commented(f"{mark}  {key}: {'...' if study is None else value_text(study[key])}", help_text))
    return "\n".join(lines) + "\n"


def list_shipped(columns: Optional[int] = None) -> str:
    """Every shipped config with its kind and description, wrapped to ``columns`` (default: the terminal's width,
    100 when it is unknown)."""
    from teachx.config.shipped import header, is_study, shipped_configs, shipped_dir  # lazy: CLI start-up

    columns = columns or shutil.get_terminal_size((100, 24)).columns

    configs = shipped_configs()
    width = max(len(n) for n in configs)
    lines = ["Shipped configs; pass the name where a CONFIG goes (a file of that name in the current folder wins):"]
    indent = " " * (2 + width + 2 + 5 + 2)
    text_width = max(columns, len(indent) + 40)  # a description wraps onto indented lines, never cut
    for name, path in configs.items():
        kind = "study" if is_study(path) else "run"
        lines += textwrap.wrap(
            header(path),
            text_width,
            initial_indent=f"  {name:<{width}}  {kind:<5}  ",
            subsequent_indent=indent,
            break_on_hyphens=False,
        ) or [f"  {name:<{width}}  {kind:<5}"]
    lines += [
        "",
        "  teachx run cifar10-lenet5 --out runs/c        teachx study study-cifar10-lenet5 --out runs/s",
        f"  the files (to copy and edit): {shipped_dir()}",
    ]
    return "\n".join(lines) + "\n"


def _option_lines(options: list[Option], indent: str = "    ") -> Iterator[str]:
    if not options:
        yield f"{indent}(no options)"
        return
    heads = [f"{o.name} (required)" if o.required else f"{o.name} = {value_text(o.default)}" for o in options]
    width = min(max(len(h) for h in heads), 34)
    for head, opt in zip(heads, options):
        yield f"{indent}{head:<{width}}  {opt.help}".rstrip()


def _describe_registry(registry, footer: list[str]) -> str:
    """Each registered name with its aliases, one-line summary and options, then how to choose one."""
    lines = []
    for name in registry.names():
        entry = registry.get(name)
        aliases = registry.aliases(name)
        lines.append(f"{name}" + (f"  (also: {', '.join(aliases)})" if aliases else ""))
        lines.append(f"    {summary(entry)}")
        lines.extend(_option_lines(callable_options(entry)))
        lines.append("")
    return "\n".join(lines + footer) + "\n"


def describe_teachers() -> str:
    from teachx.teachers import TEACHERS  # lazy: CLI start-up

    return _describe_registry(
        TEACHERS,
        [
            "Choose one with teacher.method=NAME and set its options with teacher.options.NAME=VALUE,",
            "e.g. teacher.method=lrp teacher.options.composite=epsilon; background is made by teachx",
            "from teacher.background_size training images.",
        ],
    )


def describe_methods(name: Optional[str] = None) -> str:
    """`teachx methods [NAME]`: every training method (or the one named), its paper, and its options with defaults
    and meaning."""
    from teachx.training.methods import METHODS  # lazy: CLI start-up

    names = METHODS.names() if name is None else [METHODS.canonical(name)]  # an unknown name: a one-line error
    lines = [
        "Training methods: choose one with method.name=NAME and set its options with method.options.NAME=VALUE,",
        "e.g. method.name=rrr method.options.mask=teacher. IMPACTX's options (the default method's) may also be",
        "written impactx.KEY=VALUE, e.g. impactx.lam=0 is method.options.lam=0.",
        "",
    ]
    for name in names:
        cls = METHODS.get(name)
        aliases = METHODS.aliases(name)
        lines.append(f"{name}" + (f" (also: {', '.join(aliases)})" if aliases else "") + f": {cls.summary}")
        if cls.reference:
            lines.append(f"    {cls.reference}")
        for key, opt in cls.options.items():
            lines.append(f"    {key} = {value_text(opt.default)}  # {opt.help}")
        lines.append("")
    return "\n".join(lines)


def describe_models() -> str:
    from teachx.models import MODELS  # lazy: CLI start-up

    return _describe_registry(
        MODELS,
        [
            "Choose one with model.backbone=NAME and set its options with model.options.NAME=VALUE, e.g.",
            "model.backbone=mobilenet model.options.alpha=0.5 (a different teacher model: teacher.backbone and",
            "teacher.backbone_options.NAME). torchvision:<name> and timm:<name> wrap those libraries' models",
            "when they are installed.",
        ],
    )


__all__ = ["describe_config", "describe_methods", "describe_models", "describe_teachers", "list_shipped", "value_text"]


def annotate_resolved(text: str, cfg: RunConfig) -> str:
    """The YAML of ``cfg`` with a trailing ``# resolved: ...`` comment on each data.* line left to the dataset.

    The data section is written one key per line (block style) so that each line can carry its note.
    """
    from teachx.data.options import resolved_notes  # lazy: CLI start-up (`teachx config --list` reads no data)

    notes = resolved_notes(cfg.data)
    out, section = [], None
    for line in text.splitlines(keepends=True):
        if line[:1].strip():
            section = line.split(":", 1)[0]
            if section == "data":
                out.append("data:\n")
                for key, value in to_dict(cfg.data).items():
                    flow = yaml.safe_dump(value, default_flow_style=True, width=10**6).rstrip("\n")
                    flow = flow[: -len("\n...")] if flow.endswith("\n...") else flow  # a bare scalar ends its document
                    out.append(f"  {key}: {flow}" + (f"  # resolved: {notes[key]}\n" if key in notes else "\n"))
                continue
        if section != "data":
            out.append(line)
    return "".join(out)
