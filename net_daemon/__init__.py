"""braid-netd: (network issue) builds the node's bridges, VXLAN, router and firewall."""
