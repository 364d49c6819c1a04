"""The BPF datapath: a tc program compiled through BCC from bpf/, pinned maps, tcx attach."""
