"""braid-controller: the public API (validate, write spec, serve status)."""
