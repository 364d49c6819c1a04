"""nodecryptor: send a Kubernetes node's traffic to remote nodes and pods through Cilium's
WireGuard device, leaving only the control-plane bootstrap flows in the clear."""

__version__ = "0.1.0"
