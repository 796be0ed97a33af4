"""Writes each entry of render.nix's JSON output as <name>.toml, the way
pkgs.formats.toml would: tables as [section], lists of tables as [[section]], the rest
inline.

usage: to_toml.py RENDERED.json OUT_DIR
"""
import json
import re
import sys
from pathlib import Path

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key(k):
    return k if BARE_KEY.match(k) else json.dumps(k)


def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"not a TOML value: {v!r}")


def is_table_list(v):
    return isinstance(v, list) and v != [] and all(isinstance(x, dict) for x in v)


def table(t, path, lines, header):
    if header:
        lines.append("")
        lines.append(header)
    for k, v in t.items():
        if not isinstance(v, dict) and not is_table_list(v):
            lines.append(f"{key(k)} = {value(v)}")
    for k, v in t.items():
        sub = f"{path}.{key(k)}" if path else key(k)
        if isinstance(v, dict):
            table(v, sub, lines, f"[{sub}]")
        elif is_table_list(v):
            for item in v:
                table(item, sub, lines, f"[[{sub}]]")


def main():
    rendered = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for name, settings in rendered.items():
        lines = [f"# services.proxy settings of {name}, as the module renders them (vm-tests/rendered/render.nix)."]
        table(settings, "", lines, None)
        (out / f"{name}.toml").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
