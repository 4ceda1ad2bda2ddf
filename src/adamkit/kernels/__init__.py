"""How a composed update runs: ``reference`` (per tensor: the spec), ``foreach`` (multi-tensor
ops), ``compiled`` (torch.compile, per tensor) and ``native`` (a C kernel over a table of the
tensors where they lie)."""
