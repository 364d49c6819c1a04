"""The program's maps from user space, with raw bpf(2) only (no compiler): ``encode`` turns a
DesiredState into map entries, ``diff`` writes them (and carries state between generations),
``decode`` is the one reader of every map, ``pinned`` opens a pinned generation."""
