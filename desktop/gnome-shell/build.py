#!/usr/bin/env python3
"""Builds the GNOME Shell extension from src/ twice:

    OUT/esm/UUID/      GNOME 45 and later: ES modules, src/extension.js as is
    OUT/legacy/UUID/   GNOME 43 and 44: the same code with `imports`

Usage: build.py OUT

The legacy build rewrites only the forms src/extension.js's header allows
(see there) and fails on any other import or export, so that nothing ESM-only
reaches GNOME 43 unnoticed. Each build's metadata.json lists the shell
versions that build runs on.
"""

import json
import re
import shutil
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"

# Which GNOME Shell releases each build is for. 43 is what the tests run;
# see README.md, "GNOME Shell extension", for what was checked on others.
SHELL_VERSIONS = {
    "esm": ["45", "46", "47", "48"],
    "legacy": ["43", "44"],
}

GI_IMPORT = re.compile(r"^import (\w+) from 'gi://(\w+)';$")
SHELL_IMPORT = re.compile(
    r"^import \* as (\w+) from 'resource:///org/gnome/shell/(ui|misc)/(\w+)\.js';$"
)
EXTENSION_IMPORT = "import {Extension} from 'resource:///org/gnome/shell/extensions/extension.js';"
EXTENSION_CLASS = re.compile(r"^export default class (\w+) extends Extension \{$")


class BuildError(Exception):
    pass


def to_legacy(source: str) -> str:
    """GNOME 43-44's form of the ES module `source`."""
    lines = []
    extension_class = None
    for number, line in enumerate(source.splitlines(), 1):
        if m := GI_IMPORT.match(line):
            lines.append(f"const {m[1]} = imports.gi.{m[2]};")
        elif m := SHELL_IMPORT.match(line):
            lines.append(f"const {m[1]} = imports.{m[2]}.{m[3]};")
        elif line == EXTENSION_IMPORT:
            continue
        elif m := EXTENSION_CLASS.match(line):
            if extension_class:
                raise BuildError(f"line {number}: a second extension class")
            extension_class = m[1]
            lines.append(f"class {extension_class} {{")
        elif re.match(r"^\s*(import|export)\b", line):
            raise BuildError(f"line {number}: cannot rewrite for GNOME 43-44: {line}")
        else:
            lines.append(line)
    if not extension_class:
        raise BuildError("no `export default class … extends Extension {`")
    lines += [
        "",
        "// GNOME 43-44 call init() and enable()/disable() on what it returns.",
        "function init() {",
        f"    return new {extension_class}();",
        "}",
    ]
    return "\n".join(lines) + "\n"


def build(out: Path) -> None:
    metadata = json.loads((SRC / "metadata.json").read_text())
    source = (SRC / "extension.js").read_text()
    for kind, versions in SHELL_VERSIONS.items():
        target = out / kind / metadata["uuid"]
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        code = source if kind == "esm" else to_legacy(source)
        (target / "extension.js").write_text(code)
        shutil.copyfile(SRC / "stylesheet.css", target / "stylesheet.css")
        (target / "metadata.json").write_text(
            json.dumps({**metadata, "shell-version": versions}, indent=4) + "\n"
        )


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        build(Path(sys.argv[1]))
    except BuildError as e:
        print(f"desktop/gnome-shell/src/extension.js: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
