"""Reading this node's kernel state outside the datapath: the WireGuard device, the underlay
devices and their MTUs, and link events that wake the reconcile loop."""
