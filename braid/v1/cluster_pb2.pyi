from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClusterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterInfo(_message.Message):
    __slots__ = ("cluster_name", "version", "etcd_revision", "etcd_version", "leaders", "nodes_total", "nodes_ready", "objects")
    class LeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ObjectsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ETCD_REVISION_FIELD_NUMBER: _ClassVar[int]
    ETCD_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEADERS_FIELD_NUMBER: _ClassVar[int]
    NODES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NODES_READY_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    cluster_name: str
    version: str
    etcd_revision: int
    etcd_version: str
    leaders: _containers.ScalarMap[str, str]
    nodes_total: int
    nodes_ready: int
    objects: _containers.ScalarMap[str, int]
    def __init__(self, cluster_name: _Optional[str] = ..., version: _Optional[str] = ..., etcd_revision: _Optional[int] = ..., etcd_version: _Optional[str] = ..., leaders: _Optional[_Mapping[str, str]] = ..., nodes_total: _Optional[int] = ..., nodes_ready: _Optional[int] = ..., objects: _Optional[_Mapping[str, int]] = ...) -> None: ...

class DrsMove(_message.Message):
    __slots__ = ("id", "vm", "source", "target", "reason", "source_load", "target_load")
    ID_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LOAD_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    vm: str
    source: str
    target: str
    reason: str
    source_load: float
    target_load: float
    def __init__(self, id: _Optional[str] = ..., vm: _Optional[str] = ..., source: _Optional[str] = ..., target: _Optional[str] = ..., reason: _Optional[str] = ..., source_load: _Optional[float] = ..., target_load: _Optional[float] = ...) -> None: ...

class DrsRecommendations(_message.Message):
    __slots__ = ("mode", "threshold", "generated_at", "moves", "hot", "reasons", "loads")
    class LoadsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    HOT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    threshold: float
    generated_at: str
    moves: _containers.RepeatedCompositeFieldContainer[DrsMove]
    hot: _containers.RepeatedScalarFieldContainer[str]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    loads: _containers.ScalarMap[str, float]
    def __init__(self, mode: _Optional[str] = ..., threshold: _Optional[float] = ..., generated_at: _Optional[str] = ..., moves: _Optional[_Iterable[_Union[DrsMove, _Mapping]]] = ..., hot: _Optional[_Iterable[str]] = ..., reasons: _Optional[_Iterable[str]] = ..., loads: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DrsRecommendationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrsApplyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DrsApplyResponse(_message.Message):
    __slots__ = ("move",)
    MOVE_FIELD_NUMBER: _ClassVar[int]
    move: DrsMove
    def __init__(self, move: _Optional[_Union[DrsMove, _Mapping]] = ...) -> None: ...

class RevertVolumeRequest(_message.Message):
    __slots__ = ("volume", "snapshot")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    volume: str
    snapshot: str
    def __init__(self, volume: _Optional[str] = ..., snapshot: _Optional[str] = ...) -> None: ...

class RevertVolumeResponse(_message.Message):
    __slots__ = ("extents", "pause_seconds")
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    extents: int
    pause_seconds: float
    def __init__(self, extents: _Optional[int] = ..., pause_seconds: _Optional[float] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("user", "role", "ttl_seconds")
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    user: str
    role: str
    ttl_seconds: int
    def __init__(self, user: _Optional[str] = ..., role: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: str
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[str] = ...) -> None: ...
