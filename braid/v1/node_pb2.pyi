from braid.v1 import meta_pb2 as _meta_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeSpec(_message.Message):
    __slots__ = ("unschedulable", "maintenance")
    UNSCHEDULABLE_FIELD_NUMBER: _ClassVar[int]
    MAINTENANCE_FIELD_NUMBER: _ClassVar[int]
    unschedulable: bool
    maintenance: bool
    def __init__(self, unschedulable: _Optional[bool] = ..., maintenance: _Optional[bool] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("cpus", "memory_bytes")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpus: int
    memory_bytes: int
    def __init__(self, cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class DaemonStatus(_message.Message):
    __slots__ = ("name", "live", "version", "grpc_address", "metrics_address", "pid", "started_at", "lease_id", "migration_uri", "owner", "peer_address", "nbd_address", "nbd_socket_dir", "tunnel_address", "tunnel_port", "applied_revision", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_URI_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NBD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NBD_SOCKET_DIR_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_PORT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    live: bool
    version: str
    grpc_address: str
    metrics_address: str
    pid: int
    started_at: str
    lease_id: int
    migration_uri: str
    owner: str
    peer_address: str
    nbd_address: str
    nbd_socket_dir: str
    tunnel_address: str
    tunnel_port: int
    applied_revision: int
    message: str
    def __init__(self, name: _Optional[str] = ..., live: _Optional[bool] = ..., version: _Optional[str] = ..., grpc_address: _Optional[str] = ..., metrics_address: _Optional[str] = ..., pid: _Optional[int] = ..., started_at: _Optional[str] = ..., lease_id: _Optional[int] = ..., migration_uri: _Optional[str] = ..., owner: _Optional[str] = ..., peer_address: _Optional[str] = ..., nbd_address: _Optional[str] = ..., nbd_socket_dir: _Optional[str] = ..., tunnel_address: _Optional[str] = ..., tunnel_port: _Optional[int] = ..., applied_revision: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("phase", "addresses", "capacity", "allocatable", "allocated", "hypervisor", "numa_cells", "daemons", "conditions", "registered_at", "kernel", "cpu_used_fraction", "memory_used_bytes", "vm_cpu_cores")
    class VmCpuCoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATABLE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    HYPERVISOR_FIELD_NUMBER: _ClassVar[int]
    NUMA_CELLS_FIELD_NUMBER: _ClassVar[int]
    DAEMONS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    CPU_USED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VM_CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    phase: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    capacity: Resources
    allocatable: Resources
    allocated: Resources
    hypervisor: str
    numa_cells: int
    daemons: _containers.RepeatedCompositeFieldContainer[DaemonStatus]
    conditions: _containers.RepeatedCompositeFieldContainer[_meta_pb2.Condition]
    registered_at: str
    kernel: str
    cpu_used_fraction: float
    memory_used_bytes: int
    vm_cpu_cores: _containers.ScalarMap[str, float]
    def __init__(self, phase: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., allocatable: _Optional[_Union[Resources, _Mapping]] = ..., allocated: _Optional[_Union[Resources, _Mapping]] = ..., hypervisor: _Optional[str] = ..., numa_cells: _Optional[int] = ..., daemons: _Optional[_Iterable[_Union[DaemonStatus, _Mapping]]] = ..., conditions: _Optional[_Iterable[_Union[_meta_pb2.Condition, _Mapping]]] = ..., registered_at: _Optional[str] = ..., kernel: _Optional[str] = ..., cpu_used_fraction: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., vm_cpu_cores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: NodeSpec
    status: NodeStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[NodeSpec, _Mapping]] = ..., status: _Optional[_Union[NodeStatus, _Mapping]] = ...) -> None: ...

class NodeList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Node]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class NodeEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: Node
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[Node, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...
