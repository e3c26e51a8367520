from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

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
