"""Who may do what, shared by every service that serves gRPC: the cluster PKI
(``pki``), etcd users per daemon (``etcdauth``), identities and roles
(``authz``), the one gRPC interceptor (``guard``), the audit log (``audit``)
and rate limits (``ratelimit``).
"""
