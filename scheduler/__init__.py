"""braid-scheduler: binds VMs to nodes (scheduler issue); leader-elected."""
