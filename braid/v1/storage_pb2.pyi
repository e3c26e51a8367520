from braid.v1 import meta_pb2 as _meta_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolDisk(_message.Message):
    __slots__ = ("name", "path", "capacity_bytes", "hot_spare")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOT_SPARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    capacity_bytes: int
    hot_spare: bool
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., hot_spare: _Optional[bool] = ...) -> None: ...

class DiskPoolSpec(_message.Message):
    __slots__ = ("node", "disks")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    node: str
    disks: _containers.RepeatedCompositeFieldContainer[PoolDisk]
    def __init__(self, node: _Optional[str] = ..., disks: _Optional[_Iterable[_Union[PoolDisk, _Mapping]]] = ...) -> None: ...

class DiskStatus(_message.Message):
    __slots__ = ("name", "capacity_bytes", "used_bytes", "health", "avg_latency_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    AVG_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    capacity_bytes: int
    used_bytes: int
    health: str
    avg_latency_ms: float
    def __init__(self, name: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., health: _Optional[str] = ..., avg_latency_ms: _Optional[float] = ...) -> None: ...

class ScrubStatus(_message.Message):
    __slots__ = ("passes", "last_pass_end", "last_pass_seconds", "bytes_verified", "checksum_errors", "repaired", "mismatches", "unrepaired")
    PASSES_FIELD_NUMBER: _ClassVar[int]
    LAST_PASS_END_FIELD_NUMBER: _ClassVar[int]
    LAST_PASS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ERRORS_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    UNREPAIRED_FIELD_NUMBER: _ClassVar[int]
    passes: int
    last_pass_end: str
    last_pass_seconds: float
    bytes_verified: int
    checksum_errors: int
    repaired: int
    mismatches: int
    unrepaired: int
    def __init__(self, passes: _Optional[int] = ..., last_pass_end: _Optional[str] = ..., last_pass_seconds: _Optional[float] = ..., bytes_verified: _Optional[int] = ..., checksum_errors: _Optional[int] = ..., repaired: _Optional[int] = ..., mismatches: _Optional[int] = ..., unrepaired: _Optional[int] = ...) -> None: ...

class DiskPoolStatus(_message.Message):
    __slots__ = ("phase", "disks", "observed_generation", "scrub")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SCRUB_FIELD_NUMBER: _ClassVar[int]
    phase: str
    disks: _containers.RepeatedCompositeFieldContainer[DiskStatus]
    observed_generation: int
    scrub: ScrubStatus
    def __init__(self, phase: _Optional[str] = ..., disks: _Optional[_Iterable[_Union[DiskStatus, _Mapping]]] = ..., observed_generation: _Optional[int] = ..., scrub: _Optional[_Union[ScrubStatus, _Mapping]] = ...) -> None: ...

class DiskPool(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: DiskPoolSpec
    status: DiskPoolStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[DiskPoolSpec, _Mapping]] = ..., status: _Optional[_Union[DiskPoolStatus, _Mapping]] = ...) -> None: ...

class DiskPoolList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DiskPool]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[DiskPool, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class DiskPoolEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: DiskPool
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[DiskPool, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class VolumeQoS(_message.Message):
    __slots__ = ("iops", "bytes_per_second")
    IOPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    iops: int
    bytes_per_second: int
    def __init__(self, iops: _Optional[int] = ..., bytes_per_second: _Optional[int] = ...) -> None: ...

class VolumeSpec(_message.Message):
    __slots__ = ("size_bytes", "replicas", "extent_size_bytes", "qos", "source_snapshot", "full_clone")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EXTENT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    FULL_CLONE_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    replicas: int
    extent_size_bytes: int
    qos: VolumeQoS
    source_snapshot: str
    full_clone: bool
    def __init__(self, size_bytes: _Optional[int] = ..., replicas: _Optional[int] = ..., extent_size_bytes: _Optional[int] = ..., qos: _Optional[_Union[VolumeQoS, _Mapping]] = ..., source_snapshot: _Optional[str] = ..., full_clone: _Optional[bool] = ...) -> None: ...

class VolumeExport(_message.Message):
    __slots__ = ("node", "uri")
    NODE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    node: str
    uri: str
    def __init__(self, node: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class VolumeStatus(_message.Message):
    __slots__ = ("phase", "allocated_bytes", "extents", "healthy_extents", "exports", "message", "observed_generation", "rebuild_progress", "physical_bytes", "clone_progress")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_EXTENTS_FIELD_NUMBER: _ClassVar[int]
    EXPORTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    REBUILD_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLONE_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    allocated_bytes: int
    extents: int
    healthy_extents: int
    exports: _containers.RepeatedCompositeFieldContainer[VolumeExport]
    message: str
    observed_generation: int
    rebuild_progress: float
    physical_bytes: int
    clone_progress: float
    def __init__(self, phase: _Optional[str] = ..., allocated_bytes: _Optional[int] = ..., extents: _Optional[int] = ..., healthy_extents: _Optional[int] = ..., exports: _Optional[_Iterable[_Union[VolumeExport, _Mapping]]] = ..., message: _Optional[str] = ..., observed_generation: _Optional[int] = ..., rebuild_progress: _Optional[float] = ..., physical_bytes: _Optional[int] = ..., clone_progress: _Optional[float] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: VolumeSpec
    status: VolumeStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[VolumeSpec, _Mapping]] = ..., status: _Optional[_Union[VolumeStatus, _Mapping]] = ...) -> None: ...

class VolumeList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Volume]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class VolumeEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: Volume
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[Volume, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class SnapshotSpec(_message.Message):
    __slots__ = ("volume", "description")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    volume: str
    description: str
    def __init__(self, volume: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class SnapshotStatus(_message.Message):
    __slots__ = ("phase", "message", "volume_uid", "size_bytes", "extent_size_bytes", "extents", "replicas", "allocated_bytes", "created_at", "pause_seconds")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_UID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTENT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    message: str
    volume_uid: str
    size_bytes: int
    extent_size_bytes: int
    extents: int
    replicas: int
    allocated_bytes: int
    created_at: str
    pause_seconds: float
    def __init__(self, phase: _Optional[str] = ..., message: _Optional[str] = ..., volume_uid: _Optional[str] = ..., size_bytes: _Optional[int] = ..., extent_size_bytes: _Optional[int] = ..., extents: _Optional[int] = ..., replicas: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., created_at: _Optional[str] = ..., pause_seconds: _Optional[float] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: SnapshotSpec
    status: SnapshotStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[SnapshotSpec, _Mapping]] = ..., status: _Optional[_Union[SnapshotStatus, _Mapping]] = ...) -> None: ...

class SnapshotList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Snapshot]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class SnapshotEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: Snapshot
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[Snapshot, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...
