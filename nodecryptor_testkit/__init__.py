"""Development-only companion of nodecryptor: the network-namespace lab behind `make demo`,
the fake kube-apiserver and the helpers the tests share. Never installed into the image; the
agent package never imports it (an import-linter contract in pyproject.toml)."""
