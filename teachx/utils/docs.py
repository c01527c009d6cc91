"""One-line descriptions of options, read from where the code already documents them.

- Config dataclasses: ``field(metadata={"help": ...})`` if given, else the field's trailing
  ``# comment``, else the comment block right above it (joined into one line). ``teachx config
  --describe`` prints them; a test checks that every option has one.
- Teachers and backbones: constructor options (name, default) from the signature, descriptions
  from the ``Args:`` section of the docstring (Google style: ``name: text``, continuation lines
  indented further). ``teachx teachers`` / ``teachx models`` print them.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

_NO_DEFAULT = inspect.Parameter.empty


def _clean_comment(text: str) -> str:
    return re.sub(r"\bnoqa\b.*$", "", text.lstrip("#")).strip()


@lru_cache(maxsize=None)
def _comments_of_class(cls: type) -> dict[str, str]:
    """field name -> its trailing comment, or the comment block just above it, from the class source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen or stripped install): metadata help only
        return {}
    out: dict[str, str] = {}
    depth = 0  # indentation level: 1 = the class body
    parens = 0
    pending: list[str] = []  # a comment block on its own lines, waiting for the statement below it
    statement: list[tokenize.TokenInfo] = []
    comments: list[str] = []
    line_start = True
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return {}
    for tok in tokens:
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if depth != 1:
            line_start = tok.type in (tokenize.NEWLINE, tokenize.NL)
            continue
        if tok.type == tokenize.COMMENT:
            if line_start and not statement:
                pending.append(_clean_comment(tok.string))
                line_start = False  # the NL ending this comment line is not a blank line
            else:
                comments.append(_clean_comment(tok.string))
            continue
        if tok.type == tokenize.NL:
            if line_start and not statement and not parens:
                pending = []  # a blank line ends a comment block
            line_start = not parens
            continue
        if tok.type == tokenize.NEWLINE:
            if len(statement) >= 2 and statement[0].type == tokenize.NAME and statement[1].string == ":":
                name = statement[0].string
                text = " ".join(c for c in comments if c) or " ".join(c for c in pending if c)
                if text:
                    out[name] = text
            statement, comments, pending = [], [], []
            line_start = True
            continue
        if tok.type == tokenize.OP and tok.string in "([{":
            parens += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            parens -= 1
        statement.append(tok)
        line_start = False
    return out


def option_docs(cls: type) -> dict[str, str]:
    """Field name -> one-line description for a config dataclass (base classes included)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_comments_of_class(klass))
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help") if f.metadata else None
        if help_text:
            out[f.name] = " ".join(str(help_text).split())
    return out


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


# -------------------------------------------------------------------- teachers and backbones


@dataclass
class Option:
    name: str
    default: Any  # inspect.Parameter.empty when required
    help: str

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT


def docstring_args(doc: str | None) -> dict[str, str]:
    """The ``Args:`` (or ``Options:``) section of a docstring: name -> one-line text."""
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(Args|Arguments|Options|Parameters):\s*$", lines[i])
        i += 1
        if not m:
            continue
        base = len(m.group(1))
        entry_indent, current = None, None
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                i += 1
                continue
            indent = len(line) - len(line.lstrip())
            if indent <= base:
                break
            if entry_indent is None:
                entry_indent = indent
            item = (
                re.match(r"^\s*\**([A-Za-z_]\w*)\s*(\([^)]*\))?\s*:\s*(.*)$", line) if indent == entry_indent else None
            )
            if item:
                current = item.group(1)
                out[current] = item.group(3).strip()
            elif current is not None:
                out[current] = (out[current] + " " + line.strip()).strip()
            i += 1
    return out


def callable_options(obj: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[Option]:
    """The options of a teacher class (its ``__init__``) or a backbone builder (keyword-only)."""
    if inspect.isclass(obj):
        if obj.__init__ is object.__init__:
            return []
        params = [
            p
            for p in inspect.signature(obj.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        docs: dict[str, str] = {}
        for klass in reversed(obj.__mro__):  # a subclass's Args override its bases'
            docs.update(docstring_args(klass.__doc__))
        docs.update(docstring_args(obj.__init__.__doc__))
    else:
        params = [p for p in inspect.signature(obj).parameters.values() if p.kind is p.KEYWORD_ONLY]
        docs = docstring_args(obj.__doc__)
    return [Option(p.name, p.default, docs.get(p.name, "")) for p in params if p.name not in skip]


def summary(obj: Any) -> str:
    """The first sentence-line of ``obj``'s docstring (up to the first blank line, joined)."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    first = doc.split("\n\n")[0]
    if re.match(r"^(Args|Options):", first):
        return ""
    return " ".join(first.split())
