"""braid-storaged: owns the node's disks and (storage issue) serves replicated volumes over NBD."""
