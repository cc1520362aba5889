#!/usr/bin/env python3
"""Write docs/CONFIG.md, the config reference, from the dataclass tree in actprm_ray/config.py.

    python scripts/gen_config_doc.py            # rewrite docs/CONFIG.md
    python scripts/gen_config_doc.py --check    # exit 1 if docs/CONFIG.md is out of date

The source is parsed (ast + tokenize), never imported or executed, so the reference can be built on a machine
without the project's dependencies and cannot drift from what a reader of config.py sees. Each field's help
text is its trailing `# comment`; allowed values come from the `_CHOICES` table; defaults that name a constant
imported from another actprm_ray module are resolved by parsing that module too.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_PY = REPO / "actprm_ray" / "config.py"
CONFIG_MD = REPO / "docs" / "CONFIG.md"
ROOT_CLASS = "Config"


@dataclass
class Field:
    key: str  # dotted path from the root, e.g. "labeler.judge.temperature"
    type: str  # the annotation as written
    default: str  # YAML spelling of the default (null, true, "text"), or the source expression
    help: str  # the trailing comment, without "#"


@dataclass
class Section:
    key: str  # dotted path of the section ("" never occurs: the root only holds sections)
    cls: str  # dataclass name
    fields: list[Field]


def _line_comments(source: str) -> dict[int, str]:
    """Line number -> text of the comment on that line (tokenize, so a '#' inside a string is not a comment)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _is_dataclass(node: ast.ClassDef) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
                isinstance(target, ast.Attribute) and target.attr == "dataclass"):
            return True
    return False


def _module_constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def _imported_constants(tree: ast.Module, package_root: Path) -> dict[str, object]:
    """Literal constants that config.py imports by name from other modules of this package (parsed, not run)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actprm_ray"):
            path = package_root.joinpath(*node.module.split(".")).with_suffix(".py")
            if not path.is_file():
                continue
            consts = _module_constants(ast.parse(path.read_text(), str(path)))
            for alias in node.names:
                if alias.name in consts:
                    out[alias.asname or alias.name] = consts[alias.name]
    return out


def _yaml_literal(value: object) -> str:
    # json.dumps spells None/True/False as YAML does (null/true/false) and quotes strings with valid YAML escapes.
    return json.dumps(value, ensure_ascii=False)


_EMPTY_FACTORIES = {"dict": "{}", "list": "[]"}


def _default(node: ast.expr | None, constants: dict[str, object]) -> tuple[str, str | None]:
    """(rendered default, factory name when the default is field(default_factory=NAME), e.g. a nested section)."""
    if node is None:
        return "(required)", None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field":
        for kw in node.keywords:
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Name):
                return _EMPTY_FACTORIES.get(kw.value.id, ""), kw.value.id
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Lambda):  # e.g. lambda: ["processbench"]
                return _default(kw.value.body, constants)
            if kw.arg == "default":
                return _default(kw.value, constants)
        return ast.unparse(node), None
    if isinstance(node, ast.Name) and node.id in constants:
        return f"{_yaml_literal(constants[node.id])} ({node.id})", None
    try:
        return _yaml_literal(ast.literal_eval(node)), None
    except ValueError:
        return ast.unparse(node), None


def parse_config_source(source: str, package_root: Path) -> tuple[list[Section], dict[str, tuple[str, ...]]]:
    """Every section reachable from `Config`, depth first in declaration order, plus the `_CHOICES` table."""
    tree = ast.parse(source)
    comments = _line_comments(source)
    constants = {**_imported_constants(tree, package_root), **_module_constants(tree)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and _is_dataclass(n)}
    choices = {k: tuple(v) for k, v in constants.get("_CHOICES", {}).items()}
    if ROOT_CLASS not in classes:
        raise ValueError(f"no dataclass named {ROOT_CLASS} in the config source")

    sections: list[Section] = []

    def walk(cls_name: str, prefix: str) -> None:
        fields, nested = [], []
        for stmt in classes[cls_name].body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            key = f"{prefix}.{name}" if prefix else name
            default, factory = _default(stmt.value, constants)
            if factory in classes:
                nested.append((factory, key))
                continue
            if factory is not None and factory not in _EMPTY_FACTORIES:
                # e.g. a section whose dataclass moved to another module: refuse rather than document it as a leaf
                raise ValueError(f"{key}: default_factory={factory} is neither a dataclass in this file nor dict/list")
            fields.append(Field(key, ast.unparse(stmt.annotation), default, comments.get(stmt.end_lineno, "")))
        if prefix:
            sections.append(Section(prefix, cls_name, fields))
        elif fields:
            raise ValueError(f"{ROOT_CLASS} holds plain fields ({', '.join(f.key for f in fields)}); expected sections")
        for sub, key in nested:
            walk(sub, key)

    walk(ROOT_CLASS, "")
    return sections, choices


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(config_py: Path = CONFIG_PY) -> str:
    """The full text of docs/CONFIG.md for the given config.py."""
    sections, choices = parse_config_source(config_py.read_text(), config_py.parents[1])
    rel = config_py.relative_to(config_py.parents[1]).as_posix()
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by scripts/gen_config_doc.py from {rel}; do not edit by hand. -->",
        f"Generated from `{rel}` by `python scripts/gen_config_doc.py` (a test checks it is current).",
        "",
        "Every job reads one config tree: dataclass defaults, then the YAML file given with `--config`, then",
        "`section.key=value` overrides on the command line. Unknown keys and wrong types fail with the key named;",
        "`validate()` then reports every semantic problem at once. Write `null` for None and `.inf` for infinity.",
        "The jobs that take `[--config FILE] [a.b=c ...]`: active_train, train, filter, label, evaluate (`eval`),",
        "generate (`generate`). Each saves the resolved config beside its outputs.",
        "",
        "| section | keys |",
        "|---|---|",
    ]
    lines += [f"| [`{s.key}`](#{s.key.replace('.', '')}) | {len(s.fields)} |" for s in sections]
    for s in sections:
        lines += ["", f"## {s.key}", "", f"`{s.cls}`", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for f in s.fields:
            help_text = f.help
            if f.key in choices:
                allowed = ", ".join(f"`{c}`" for c in choices[f.key])
                help_text = f"{help_text} (one of {allowed})" if help_text else f"one of {allowed}"
            lines.append(f"| `{f.key}` | `{_cell(f.type)}` | `{_cell(f.default)}` | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    p.add_argument("--config-py", type=Path, default=CONFIG_PY, help="config source (default: %(default)s)")
    p.add_argument("--out", type=Path, default=CONFIG_MD, help="output file (default: %(default)s)")
    args = p.parse_args(argv)
    text = render(args.config_py)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python scripts/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
