"""docs/ARCHITECTURE.md stays true to the tree: its module table names every module of the
nodecryptor package and nothing else; its thread table names the threads the code starts; its
pin layout names the pins pins.py makes and every map; its layer tables are the import-linter
contracts of pyproject.toml."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nodecryptor"
DOC = REPO / "docs" / "ARCHITECTURE.md"


def modules_in_tree() -> set[str]:
    return {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }


def modules_in_table() -> set[str]:
    """Backticked ``*.py`` names in the first column of the table under the header
    ``| module | concern | does I/O |``."""
    lines = DOC.read_text().splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.replace(" ", "") == "|module|concern|doesI/O|"
    )
    named = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        first_cell = line.split("|")[1]
        named.update(re.findall(r"`([^`]+\.py)`", first_cell))
    return named


def test_every_module_is_in_the_table():
    missing = sorted(modules_in_tree() - modules_in_table())
    assert not missing, f"{DOC.name}: add these modules to the module table: {missing}"


def test_every_module_in_the_table_exists():
    unknown = sorted(modules_in_table() - modules_in_tree())
    assert not unknown, f"{DOC.name}: the module table names modules that do not exist: {unknown}"


# ---- threads -------------------------------------------------------------------------------


def _section(title: str) -> list[str]:
    """The lines of the section under ``## title``, up to the next ``## `` heading."""
    lines = DOC.read_text().splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1 : end]


def _table(lines: list[str], header: str) -> list[list[str]]:
    """The rows (lists of cells) of the table whose header row, spaces removed, is ``header``."""
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "") == header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _loop_values(tree: ast.AST, call: ast.Call, var: str) -> set[str]:
    """The strings ``var`` takes in a ``for (…, var, …) in ((…), (…))`` around ``call``."""
    out: set[str] = set()
    for loop in ast.walk(tree):
        if not (
            isinstance(loop, ast.For)
            and isinstance(loop.target, ast.Tuple)
            and any(n is call for n in ast.walk(loop))
        ):
            continue
        names = [getattr(t, "id", None) for t in loop.target.elts]
        if var not in names or not isinstance(loop.iter, ast.Tuple):
            continue
        index = names.index(var)
        for item in loop.iter.elts:
            value = item.elts[index] if isinstance(item, ast.Tuple) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                out.add(value.value)
    return out


def thread_names_in_code() -> set[str]:
    """Every name given to a ``threading.Thread`` in the package: literal names, names a loop
    iterates over, and f-string names filled with the ``name=`` the class is built with."""
    trees = {path: ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}
    names: set[str] = set()
    for tree in trees.values():
        classes = [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)]
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and _call_name(call.func) == "Thread"):
                continue
            name = next((k.value for k in call.keywords if k.arg == "name"), None)
            if isinstance(name, ast.Constant):
                names.add(name.value)
            elif isinstance(name, ast.Name):
                found = _loop_values(tree, call, name.id)
                assert found, f"cannot resolve the thread name {name.id} at line {call.lineno}"
                names |= found
            elif isinstance(name, ast.JoinedStr):
                owner = next(c.name for c in classes if any(n is call for n in ast.walk(c)))
                template = "".join(
                    v.value if isinstance(v, ast.Constant) else "{}" for v in name.values
                )
                built = {
                    k.value.value
                    for t in trees.values()
                    for c in ast.walk(t)
                    if isinstance(c, ast.Call) and _call_name(c.func) == owner
                    for k in c.keywords
                    if k.arg == "name" and isinstance(k.value, ast.Constant)
                }
                assert built, f"no {owner}(name=...) found for the thread name {template}"
                names |= {template.format(b) for b in built}
            else:
                raise AssertionError(f"thread without a resolvable name at line {call.lineno}")
    return names


def thread_names_in_doc() -> set[str]:
    rows = _table(_section("Threads and what wakes them"), "|thread|does|wokenby|")
    names = set()
    for first, *_ in rows:
        # The backticked names before the first "(": the thread names, not the callables.
        names.update(re.findall(r"`([a-z0-9-]+)`", first.split("(")[0]))
    return names


def test_thread_table_names_the_threads_the_code_starts():
    code, doc = thread_names_in_code(), thread_names_in_doc()
    assert {"k8s-sync", "netwatch", "health-server"} <= code  # the extraction finds them
    assert code == doc, (
        f"{DOC.name}, Threads: missing {sorted(code - doc)}, "
        f"not started by the code {sorted(doc - code)}"
    )


# ---- pins ----------------------------------------------------------------------------------


def _pin_block() -> list[str]:
    lines = _section("Pin layout")
    start = lines.index("```")
    end = lines.index("```", start + 1)
    return lines[start + 1 : end]


def pins_in_code() -> set[str]:
    """Every pin path pins.py makes, relative to nodecryptor's root, with <N>, <map> and
    <ifname> standing for the generation number, map name and device."""
    from nodecryptor.datapath.bpf import pins

    bpffs = "/bpffs"
    top = pins.root(bpffs)
    paths = {
        os.path.join(pins.generation_dir(bpffs, 7), "<map>"),
        pins.maps_dir(bpffs),
        pins.link_path(bpffs, "<ifname>"),
        pins.link_path(bpffs, "<ifname>", "ingress"),
        pins.prog_path(bpffs),
        pins.explain_prog_path(bpffs),
        pins.ingress_prog_path(bpffs),
        pins.explain_ingress_prog_path(bpffs),
    }
    key = "0" * 32
    key_dir = pins.program_key_dir(bpffs, key)
    paths |= {os.path.join(key_dir, name) for name in pins.PROGRAM_PINS.values()}
    paths.add(os.path.join(key_dir, pins.PROGRAM_MAPS, "<map>"))
    return {os.path.relpath(p, top).replace("/g7/", "/g<N>/").replace(key, "<key>") for p in paths}


def pins_in_doc() -> set[str]:
    return {
        line.split()[0]
        for line in _pin_block()
        if line.startswith("  ") and not line.startswith("   ")
    }


def test_pin_layout_names_the_pins_the_code_makes():
    code, doc = pins_in_code(), pins_in_doc()
    assert code == doc, (
        f"{DOC.name}, Pin layout: missing {sorted(code - doc)}, "
        f"not made by pins.py {sorted(doc - code)}"
    )


def test_pin_layout_lists_every_map():
    from nodecryptor.datapath.bpf import abi

    block = " ".join(_pin_block())
    listed = set(re.findall(r"\bnc_[a-z0-9_]+\b", block)) - {"nc_ingress"}
    assert listed == {m.name for m in abi.MAP_SPECS}


# ---- layers --------------------------------------------------------------------------------


def _contracts() -> dict[str, list[set[str]]]:
    """{container: layers top first, each a set of module names} of pyproject's layer
    contracts."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    out = {}
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract["type"] != "layers":
            continue
        [container] = contract["containers"]
        out[container] = [
            {part.strip() for part in layer.split("|")} for layer in contract["layers"]
        ]
    return out


def test_package_layer_table_matches_the_contract():
    rows = _table(_section("Layers: decide, then act"), "|layer(topfirst)|package|concern|")
    doc = [{re.sub(r"(\.py|/)$", "", n) for n in re.findall(r"`([^`]+)`", row[1])} for row in rows]
    assert doc == _contracts()["nodecryptor"]


def test_module_layer_table_matches_the_contracts():
    rows = _table(_section("Layers: decide, then act"), "|inside|layers,topfirst|")
    doc = {
        f"nodecryptor.{row[0].strip('`')}": [
            set(re.findall(r"`([^`]+)`", layer)) for layer in row[1].split(" / ")
        ]
        for row in rows
    }
    contracts = {k: v for k, v in _contracts().items() if k != "nodecryptor"}
    assert doc == contracts
