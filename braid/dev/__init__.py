"""Developer and test tooling on top of the services: the local cluster, the
etcd launcher, the tiny test guest, the libvirtd helper (and the lab of
isolated hosts). Nothing in the library or a service imports this package.
"""
