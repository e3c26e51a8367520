"""braid-node-agent: registers its node and (compute issue) runs VMs."""
