"""Thin gRPC servicers of the braid.v1 API: decode, call one domain
function (controller/resources.py), encode. One generic handler serves the
six methods of every kind's service."""

from __future__ import annotations

import logging
import threading
import time

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Counter, Histogram

from braid import __version__, keys
from braid import kinds as K
from braid.store import Store, StoreError
from braid.v1 import cluster_pb2, meta_pb2
from braid.validation import FieldError
from controller.resources import ApiError, Resources
from controller.snapshots import revert

log = logging.getLogger("braid.controller.api")

REQUESTS = Counter("braid_api_requests_total", "API requests", ["kind", "method", "code"])
LATENCY = Histogram("braid_api_request_seconds", "API request latency", ["kind", "method"])
WATCHERS = Counter("braid_api_watch_streams_total", "Watch streams opened", ["kind"])


def _abort(context: grpc.ServicerContext, err: ApiError) -> None:
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    if err.violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations]))
        status.details.append(detail)
    context.abort_with_status(rpc_status.to_status(status))


def _unary(kind: K.Kind, method: str, fn):
    def handler(request, context):
        start = time.perf_counter()
        code = "OK"
        try:
            return fn(request)
        except ApiError as err:
            code = err.code.name
            _abort(context, err)
        except Exception:  # a bug must not take the daemon down: report INTERNAL
            code = "INTERNAL"
            log.exception("%s %s failed", kind.name, method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {kind.name} {method}")
        finally:
            REQUESTS.labels(kind.name, method, code).inc()
            LATENCY.labels(kind.name, method).observe(time.perf_counter() - start)

    return handler


def kind_handler(resources: Resources, kind: K.Kind) -> grpc.GenericRpcHandler:
    def create(obj):
        return resources.create(kind, obj)

    def get(req):
        return resources.get(kind, req.name)

    def update(obj):
        return resources.update(kind, obj)

    def delete(req):
        rev = resources.delete(kind, req.name, req.resource_version)
        return meta_pb2.DeleteResponse(name=req.name, revision=rev)

    def watch(req, context):
        WATCHERS.labels(kind.name).inc()
        stop = threading.Event()
        context.add_callback(stop.set)
        try:
            for typ, obj, rev in resources.watch(kind, req, stop):
                if not context.is_active():
                    return
                if typ == 0:
                    continue  # heartbeat: lets us notice a gone client
                ev = kind.event_message(type=typ, revision=rev)
                if obj is not None:
                    ev.object.CopyFrom(obj)
                yield ev
        except ApiError as err:
            _abort(context, err)
        except Exception:
            log.exception("%s watch failed", kind.name)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {kind.name} watch")
        finally:
            stop.set()

    def list_wrapped(req, context):
        items, rev, corrupt = None, None, None
        try:
            items, rev, corrupt = resources.list(kind, req.label_selector)
        except ApiError as err:
            REQUESTS.labels(kind.name, "List", err.code.name).inc()
            _abort(context, err)
        if corrupt:
            context.set_trailing_metadata((("braid-corrupt-objects", ",".join(corrupt)[:4000]),))
        REQUESTS.labels(kind.name, "List", "OK").inc()
        return kind.list_message(items=items, resource_version=rev)

    msg = kind.message
    ser = lambda m: m.SerializeToString()  # noqa: E731
    handlers = {
        "Create": grpc.unary_unary_rpc_method_handler(
            _unary(kind, "Create", create), msg.FromString, ser),
        "Get": grpc.unary_unary_rpc_method_handler(
            _unary(kind, "Get", get), meta_pb2.GetRequest.FromString, ser),
        "List": grpc.unary_unary_rpc_method_handler(
            list_wrapped, meta_pb2.ListRequest.FromString, ser),
        "Update": grpc.unary_unary_rpc_method_handler(
            _unary(kind, "Update", update), msg.FromString, ser),
        "Delete": grpc.unary_unary_rpc_method_handler(
            _unary(kind, "Delete", delete), meta_pb2.DeleteRequest.FromString, ser),
        "Watch": grpc.unary_stream_rpc_method_handler(
            watch, meta_pb2.WatchRequest.FromString, ser),
    }
    return grpc.method_handlers_generic_handler(kind.service, handlers)


def cluster_handler(store: Store, resources: Resources, cluster_name: str,
                    tokens=None) -> grpc.GenericRpcHandler:
    def info(_req):
        out = cluster_pb2.ClusterInfo(cluster_name=cluster_name, version=__version__)
        elections, rev = store.list(keys.ELECTION)
        out.etcd_revision = rev
        for kv in elections:
            out.leaders[kv.key.removeprefix(keys.ELECTION)] = kv.value.decode(errors="replace")
        for kind in K.KINDS.values():
            items, _, _ = resources.list(kind)
            out.objects[kind.name] = len(items)
            if kind.name == "node":
                out.nodes_total = len(items)
                out.nodes_ready = sum(1 for n in items if n.status.phase == "Ready")
        return out

    def safe_info(req, context):
        try:
            return info(req)
        except ApiError as err:
            _abort(context, err)
        except StoreError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def recommendations(_req) -> cluster_pb2.DrsRecommendations:
        kv = store.get(keys.DRS_RECOMMENDATIONS)
        if kv is None:
            return cluster_pb2.DrsRecommendations(reasons=["no DRS round has run yet (is a scheduler "
                                                           "running, with --drs-mode manual or automatic?)"])
        try:
            return K.from_json(kv.value, cluster_pb2.DrsRecommendations, kv.key)
        except K.CorruptObject as exc:
            raise ApiError(grpc.StatusCode.DATA_LOSS, str(exc)) from None

    def apply(req: cluster_pb2.DrsApplyRequest) -> cluster_pb2.DrsApplyResponse:
        ident = req.id.strip()
        if len(ident) < 4:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "give a recommendation id (at least 4 characters)",
                           [FieldError("id", "at least 4 characters")])
        recs = recommendations(None)
        found = [m for m in recs.moves if m.id == ident] or [m for m in recs.moves if m.id.startswith(ident)]
        if not found:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"no current DRS recommendation {ident!r} "
                                                      "(braid drs recommendations lists them)")
        if len(found) > 1:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{ident!r} matches {len(found)} recommendations",
                           [FieldError("id", "ambiguous prefix")])
        move = found[0]
        vm = resources.get(K.KINDS["vm"], move.vm)
        if vm.spec.node != move.source:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"vm {move.vm} is on {vm.spec.node or 'no node'} now, not {move.source}")
        vm.spec.node = move.target
        vm.ClearField("status")
        resources.update(K.KINDS["vm"], vm)
        return cluster_pb2.DrsApplyResponse(move=move)

    def revert_volume(req: cluster_pb2.RevertVolumeRequest) -> cluster_pb2.RevertVolumeResponse:
        for field in ("volume", "snapshot"):
            if not getattr(req, field):
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required",
                               [FieldError(field, "required")])
        n, pause = revert(store, req.volume, req.snapshot)
        return cluster_pb2.RevertVolumeResponse(extents=n, pause_seconds=round(pause, 4))

    def issue_token(req: cluster_pb2.IssueTokenRequest) -> cluster_pb2.IssueTokenResponse:
        if tokens is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "tokens need TLS (this controller runs without)")
        ttl = req.ttl_seconds or 86400
        try:
            token = tokens.issue(req.user, req.role, ttl)
        except ValueError as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + ttl))
        return cluster_pb2.IssueTokenResponse(token=token, expires_at=expires)

    def guarded(fn):
        def call(req, context):
            try:
                return fn(req)
            except ApiError as err:
                _abort(context, err)
            except StoreError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return call

    return grpc.method_handlers_generic_handler("braid.v1.ClusterService", {
        "Info": grpc.unary_unary_rpc_method_handler(
            safe_info, cluster_pb2.ClusterInfoRequest.FromString,
            lambda m: m.SerializeToString()),
        "GetDrsRecommendations": grpc.unary_unary_rpc_method_handler(
            guarded(recommendations), cluster_pb2.DrsRecommendationsRequest.FromString,
            lambda m: m.SerializeToString()),
        "DrsApply": grpc.unary_unary_rpc_method_handler(
            guarded(apply), cluster_pb2.DrsApplyRequest.FromString, lambda m: m.SerializeToString()),
        "IssueToken": grpc.unary_unary_rpc_method_handler(
            guarded(issue_token), cluster_pb2.IssueTokenRequest.FromString,
            lambda m: m.SerializeToString()),
        "RevertVolume": grpc.unary_unary_rpc_method_handler(
            guarded(revert_volume), cluster_pb2.RevertVolumeRequest.FromString,
            lambda m: m.SerializeToString()),
    })

