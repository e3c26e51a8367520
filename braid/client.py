"""A small Python client of the braid.v1 API (used by the CLI, the tests and
the benchmarks). Errors surface as ``ApiCallError`` with the gRPC code, the
message and the field violations the server attached."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from braid import kinds as K
from braid.v1 import cluster_pb2, meta_pb2

MAX_MESSAGE_BYTES = 4 << 20


@dataclass
class ApiCallError(Exception):
    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> "ApiCallError":
        violations = []
        try:
            status = rpc_status.from_call(exc)
        except Exception:
            status = None
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    detail.Unpack(br)
                    violations += [(v.field, v.description) for v in br.field_violations]
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code, details or code.name, violations)


class Client:
    def __init__(self, address: str, timeout: float = 10.0, tls=None, token: str = "", ca: str = ""):
        """``tls`` (``braid.auth.pki.TlsFiles``): mutual TLS with a certificate of the
        cluster; ``token`` (with ``ca``, the cluster CA bundle): a bearer token
        over TLS (the controller's token port); neither: plaintext."""
        self.address = address
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls is not None:
            from braid.auth.pki import grpc_channel_credentials
            self.channel = grpc.secure_channel(address, grpc_channel_credentials(tls), options=options)
        elif token:
            with open(ca, "rb") as f:
                creds = grpc.composite_channel_credentials(
                    grpc.ssl_channel_credentials(root_certificates=f.read()),
                    grpc.access_token_call_credentials(token))
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unary(self, kind: K.Kind, method: str, request, response_cls):
        call = self.channel.unary_unary(
            f"/{kind.service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        try:
            resp, c = call.with_call(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ApiCallError.from_rpc(exc) from None
        return resp, c

    def create(self, obj):
        kind = K.lookup(obj.DESCRIPTOR.name)
        return self._unary(kind, "Create", obj, kind.message)[0]

    def update(self, obj):
        kind = K.lookup(obj.DESCRIPTOR.name)
        return self._unary(kind, "Update", obj, kind.message)[0]

    def get(self, kind: K.Kind | str, name: str):
        kind = K.lookup(kind) if isinstance(kind, str) else kind
        return self._unary(kind, "Get", meta_pb2.GetRequest(name=name), kind.message)[0]

    def list(self, kind: K.Kind | str, label_selector: str = ""):
        """Returns (items, resource_version, names of corrupt objects skipped)."""
        kind = K.lookup(kind) if isinstance(kind, str) else kind
        resp, call = self._unary(kind, "List", meta_pb2.ListRequest(label_selector=label_selector),
                                 kind.list_message)
        corrupt = []
        for k, v in call.trailing_metadata() or ():
            if k == "braid-corrupt-objects" and v:
                corrupt = v.split(",")
        return list(resp.items), resp.resource_version, corrupt

    def delete(self, kind: K.Kind | str, name: str, resource_version: int = 0):
        kind = K.lookup(kind) if isinstance(kind, str) else kind
        return self._unary(kind, "Delete", meta_pb2.DeleteRequest(
            name=name, resource_version=resource_version), meta_pb2.DeleteResponse)[0]

    def watch(self, kind: K.Kind | str, resource_version: int = 0, name: str = "",
              label_selector: str = "", timeout: float | None = None) -> Iterator:
        """Yields event messages (type, object, revision) until cancelled."""
        kind = K.lookup(kind) if isinstance(kind, str) else kind
        call = self.channel.unary_stream(
            f"/{kind.service}/Watch",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=kind.event_message.FromString,
        )
        stream = call(meta_pb2.WatchRequest(resource_version=resource_version, name=name,
                                            label_selector=label_selector), timeout=timeout)
        return _WatchStream(stream)

    def _cluster_call(self, method: str, request, reply_cls):
        call = self.channel.unary_unary(f"/braid.v1.ClusterService/{method}",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=reply_cls.FromString)
        try:
            return call(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ApiCallError.from_rpc(exc) from None

    def drs_recommendations(self) -> cluster_pb2.DrsRecommendations:
        return self._cluster_call("GetDrsRecommendations", cluster_pb2.DrsRecommendationsRequest(),
                                  cluster_pb2.DrsRecommendations)

    def drs_apply(self, ident: str) -> cluster_pb2.DrsMove:
        return self._cluster_call("DrsApply", cluster_pb2.DrsApplyRequest(id=ident),
                                  cluster_pb2.DrsApplyResponse).move

    def issue_token(self, user: str, role: str, ttl_seconds: int = 0) -> cluster_pb2.IssueTokenResponse:
        return self._cluster_call("IssueToken", cluster_pb2.IssueTokenRequest(
            user=user, role=role, ttl_seconds=ttl_seconds), cluster_pb2.IssueTokenResponse)

    def revert_volume(self, volume: str, snapshot: str) -> cluster_pb2.RevertVolumeResponse:
        return self._cluster_call("RevertVolume", cluster_pb2.RevertVolumeRequest(volume=volume, snapshot=snapshot),
                                  cluster_pb2.RevertVolumeResponse)

    def info(self) -> cluster_pb2.ClusterInfo:
        call = self.channel.unary_unary(
            "/braid.v1.ClusterService/Info",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=cluster_pb2.ClusterInfo.FromString,
        )
        try:
            return call(cluster_pb2.ClusterInfoRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ApiCallError.from_rpc(exc) from None


class _WatchStream:
    """Iterator over a watch; ``cancel()`` ends it from another thread."""

    def __init__(self, stream):
        self._stream = stream

    def __iter__(self):
        try:
            yield from self._stream
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise ApiCallError.from_rpc(exc) from None

    def cancel(self) -> None:
        self._stream.cancel()
