"""`kubectl kustomize` (kustomize built into kubectl, offline) renders k8s/ and every optional
component into exactly the objects the files hold, and an `images:` entry retargets the image
the way docs/operator-guide.md tells operators to."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from conftest import require
from deploy_manifests import K8S, REPO, default_docs, kustomizations, load_docs


def render(directory) -> list[dict]:
    require(shutil.which("kubectl") is not None, "kubectl (with built-in kustomize) not installed")
    proc = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory}: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def identities(bodies: list[dict]) -> set[tuple[str, str, str]]:
    return {(b["kind"], b["metadata"].get("namespace", ""), b["metadata"]["name"]) for b in bodies}


@pytest.mark.parametrize(
    "kustomization", kustomizations(), ids=lambda p: str(p.parent.relative_to(REPO))
)
def test_kustomization_renders_its_files(kustomization):
    rendered = render(kustomization.parent)
    listed = yaml.safe_load(kustomization.read_text())["resources"]
    expected = [d.body for r in listed for d in load_docs(kustomization.parent / r)]
    assert identities(rendered) == identities(expected)
    # Nothing is transformed on the way: the rendered objects are the files' objects.
    by_id = {(b["kind"], b["metadata"]["name"]): b for b in rendered}
    for body in expected:
        assert by_id[(body["kind"], body["metadata"]["name"])] == body


def test_default_render_is_the_default_installation():
    assert identities(render(K8S)) == identities([d.body for d in default_docs()])


def test_images_entry_retargets_the_agent_image(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kust_path = copy / "kustomization.yaml"
    kust = yaml.safe_load(kust_path.read_text())
    kust["images"] = [
        {"name": "nodecryptor", "newName": "registry.example/nodecryptor", "newTag": "9.9.9"}
    ]
    kust_path.write_text(yaml.safe_dump(kust))
    daemonset = next(b for b in render(copy) if b["kind"] == "DaemonSet")
    images = [c["image"] for c in daemonset["spec"]["template"]["spec"]["containers"]]
    assert images == ["registry.example/nodecryptor:9.9.9"]
