"""Narrow doors: exactly one module imports the Kubernetes client, exactly one imports bcc,
and pyroute2 stays in kernel-facing modules. Checked on the source, so it cannot be bypassed
by import order."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nodecryptor"


def importers(top_module: str) -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == top_module or n.startswith(top_module + ".") for n in names):
                found.add(str(path.relative_to(PACKAGE.parent)))
    return found


def test_only_k8s_imports_kubernetes():
    assert importers("kubernetes") <= {"nodecryptor/k8s.py"}


def test_only_program_imports_bcc():
    assert importers("bcc") <= {"nodecryptor/datapath/bpf/program.py"}


def test_policy_layer_performs_no_io():
    pure = ["policy.py", "model.py", "ports.py", "ciliumnode.py", "settings.py", "cilium.py"]
    for name in pure:
        tree = ast.parse((PACKAGE / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert not imported & {"os", "socket", "subprocess", "pyroute2", "kubernetes", "bcc",
                               "requests", "urllib3"}, name


def test_pyroute2_only_in_kernel_facing_modules():
    allowed_prefixes = ("nodecryptor/datapath/", "nodecryptor_testkit/lab/", "nodecryptor_testkit/")
    allowed = {"nodecryptor/wireguard.py", "nodecryptor/devices.py", "nodecryptor/netwatch.py"}
    offenders = {p for p in importers("pyroute2")
                 if p not in allowed and not p.startswith(allowed_prefixes)}
    assert offenders == set()
