"""Decisions without I/O: which claims of other nodes are admitted (admission), what the
CiliumNode and Node objects say (ciliumnode), what nodecryptor concludes about Cilium (cilium),
exemption policies (exemptions), peer health (peerhealth) and the desired state (plan)."""
