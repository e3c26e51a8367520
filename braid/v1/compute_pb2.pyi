from braid.v1 import meta_pb2 as _meta_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PowerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POWER_STATE_UNSPECIFIED: _ClassVar[PowerState]
    RUNNING: _ClassVar[PowerState]
    STOPPED: _ClassVar[PowerState]
    PAUSED: _ClassVar[PowerState]
POWER_STATE_UNSPECIFIED: PowerState
RUNNING: PowerState
STOPPED: PowerState
PAUSED: PowerState

class VMDisk(_message.Message):
    __slots__ = ("name", "volume", "bus", "boot_order", "read_only", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    BUS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ORDER_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    volume: str
    bus: str
    boot_order: int
    read_only: bool
    path: str
    def __init__(self, name: _Optional[str] = ..., volume: _Optional[str] = ..., bus: _Optional[str] = ..., boot_order: _Optional[int] = ..., read_only: _Optional[bool] = ..., path: _Optional[str] = ...) -> None: ...

class VMNic(_message.Message):
    __slots__ = ("name", "network", "port", "mac", "model", "bridge", "security_groups")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    SECURITY_GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    network: str
    port: str
    mac: str
    model: str
    bridge: str
    security_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., network: _Optional[str] = ..., port: _Optional[str] = ..., mac: _Optional[str] = ..., model: _Optional[str] = ..., bridge: _Optional[str] = ..., security_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class VMBoot(_message.Message):
    __slots__ = ("kernel", "initrd", "cmdline", "firmware")
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    INITRD_FIELD_NUMBER: _ClassVar[int]
    CMDLINE_FIELD_NUMBER: _ClassVar[int]
    FIRMWARE_FIELD_NUMBER: _ClassVar[int]
    kernel: str
    initrd: str
    cmdline: str
    firmware: str
    def __init__(self, kernel: _Optional[str] = ..., initrd: _Optional[str] = ..., cmdline: _Optional[str] = ..., firmware: _Optional[str] = ...) -> None: ...

class HAPolicy(_message.Message):
    __slots__ = ("enabled", "priority")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    priority: int
    def __init__(self, enabled: _Optional[bool] = ..., priority: _Optional[int] = ...) -> None: ...

class VMSpec(_message.Message):
    __slots__ = ("vcpus", "max_vcpus", "memory_mib", "max_memory_mib", "disks", "nics", "boot", "cpu_model", "ha", "power_state", "node_selector", "affinity_group", "anti_affinity_group", "node")
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MAX_VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    NICS_FIELD_NUMBER: _ClassVar[int]
    BOOT_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    HA_FIELD_NUMBER: _ClassVar[int]
    POWER_STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_GROUP_FIELD_NUMBER: _ClassVar[int]
    ANTI_AFFINITY_GROUP_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    vcpus: int
    max_vcpus: int
    memory_mib: int
    max_memory_mib: int
    disks: _containers.RepeatedCompositeFieldContainer[VMDisk]
    nics: _containers.RepeatedCompositeFieldContainer[VMNic]
    boot: VMBoot
    cpu_model: str
    ha: HAPolicy
    power_state: PowerState
    node_selector: _containers.ScalarMap[str, str]
    affinity_group: str
    anti_affinity_group: str
    node: str
    def __init__(self, vcpus: _Optional[int] = ..., max_vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ..., max_memory_mib: _Optional[int] = ..., disks: _Optional[_Iterable[_Union[VMDisk, _Mapping]]] = ..., nics: _Optional[_Iterable[_Union[VMNic, _Mapping]]] = ..., boot: _Optional[_Union[VMBoot, _Mapping]] = ..., cpu_model: _Optional[str] = ..., ha: _Optional[_Union[HAPolicy, _Mapping]] = ..., power_state: _Optional[_Union[PowerState, str]] = ..., node_selector: _Optional[_Mapping[str, str]] = ..., affinity_group: _Optional[str] = ..., anti_affinity_group: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class MigrationStatus(_message.Message):
    __slots__ = ("target_node", "phase", "data_remaining_bytes", "data_total_bytes", "downtime_ms", "message")
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DATA_REMAINING_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    target_node: str
    phase: str
    data_remaining_bytes: int
    data_total_bytes: int
    downtime_ms: int
    message: str
    def __init__(self, target_node: _Optional[str] = ..., phase: _Optional[str] = ..., data_remaining_bytes: _Optional[int] = ..., data_total_bytes: _Optional[int] = ..., downtime_ms: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class VMStatus(_message.Message):
    __slots__ = ("phase", "node", "power_state", "console_path", "addresses", "message", "migration", "observed_generation", "conditions")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    POWER_STATE_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_PATH_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    node: str
    power_state: PowerState
    console_path: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    message: str
    migration: MigrationStatus
    observed_generation: int
    conditions: _containers.RepeatedCompositeFieldContainer[_meta_pb2.Condition]
    def __init__(self, phase: _Optional[str] = ..., node: _Optional[str] = ..., power_state: _Optional[_Union[PowerState, str]] = ..., console_path: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., migration: _Optional[_Union[MigrationStatus, _Mapping]] = ..., observed_generation: _Optional[int] = ..., conditions: _Optional[_Iterable[_Union[_meta_pb2.Condition, _Mapping]]] = ...) -> None: ...

class VM(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: VMSpec
    status: VMStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[VMSpec, _Mapping]] = ..., status: _Optional[_Union[VMStatus, _Mapping]] = ...) -> None: ...

class VMList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[VM]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[VM, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class VMEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: VM
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[VM, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...
