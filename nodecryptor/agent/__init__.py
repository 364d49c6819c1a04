"""The running agent (`nodecryptor run`): its wiring, the reconcile loop, the peer-health loop
and the records it leaves for other processes of the node."""
