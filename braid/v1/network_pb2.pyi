from braid.v1 import meta_pb2 as _meta_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    INGRESS: _ClassVar[Direction]
    EGRESS: _ClassVar[Direction]
DIRECTION_UNSPECIFIED: Direction
INGRESS: Direction
EGRESS: Direction

class NetworkSpec(_message.Message):
    __slots__ = ("vni", "mtu", "description")
    VNI_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    vni: int
    mtu: int
    description: str
    def __init__(self, vni: _Optional[int] = ..., mtu: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class NetworkStatus(_message.Message):
    __slots__ = ("phase", "vni", "nodes", "applied_revision", "observed_generation", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    VNI_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    vni: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    applied_revision: int
    observed_generation: int
    message: str
    def __init__(self, phase: _Optional[str] = ..., vni: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., applied_revision: _Optional[int] = ..., observed_generation: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Network(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: NetworkSpec
    status: NetworkStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[NetworkSpec, _Mapping]] = ..., status: _Optional[_Union[NetworkStatus, _Mapping]] = ...) -> None: ...

class NetworkList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Network]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[Network, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class NetworkEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: Network
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[Network, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class SubnetSpec(_message.Message):
    __slots__ = ("network", "cidr", "gateway", "dhcp", "dns_servers", "router")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    CIDR_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DHCP_FIELD_NUMBER: _ClassVar[int]
    DNS_SERVERS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    network: str
    cidr: str
    gateway: str
    dhcp: bool
    dns_servers: _containers.RepeatedScalarFieldContainer[str]
    router: str
    def __init__(self, network: _Optional[str] = ..., cidr: _Optional[str] = ..., gateway: _Optional[str] = ..., dhcp: _Optional[bool] = ..., dns_servers: _Optional[_Iterable[str]] = ..., router: _Optional[str] = ...) -> None: ...

class SubnetStatus(_message.Message):
    __slots__ = ("phase", "allocated_ips", "free_ips", "observed_generation")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_IPS_FIELD_NUMBER: _ClassVar[int]
    FREE_IPS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    allocated_ips: int
    free_ips: int
    observed_generation: int
    def __init__(self, phase: _Optional[str] = ..., allocated_ips: _Optional[int] = ..., free_ips: _Optional[int] = ..., observed_generation: _Optional[int] = ...) -> None: ...

class Subnet(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: SubnetSpec
    status: SubnetStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[SubnetSpec, _Mapping]] = ..., status: _Optional[_Union[SubnetStatus, _Mapping]] = ...) -> None: ...

class SubnetList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Subnet]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[Subnet, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class SubnetEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: Subnet
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[Subnet, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class FixedIP(_message.Message):
    __slots__ = ("subnet", "ip")
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    subnet: str
    ip: str
    def __init__(self, subnet: _Optional[str] = ..., ip: _Optional[str] = ...) -> None: ...

class PortSpec(_message.Message):
    __slots__ = ("network", "mac", "fixed_ips", "security_groups", "vm", "nic", "node")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    FIXED_IPS_FIELD_NUMBER: _ClassVar[int]
    SECURITY_GROUPS_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    NIC_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    network: str
    mac: str
    fixed_ips: _containers.RepeatedCompositeFieldContainer[FixedIP]
    security_groups: _containers.RepeatedScalarFieldContainer[str]
    vm: str
    nic: str
    node: str
    def __init__(self, network: _Optional[str] = ..., mac: _Optional[str] = ..., fixed_ips: _Optional[_Iterable[_Union[FixedIP, _Mapping]]] = ..., security_groups: _Optional[_Iterable[str]] = ..., vm: _Optional[str] = ..., nic: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class PortStatus(_message.Message):
    __slots__ = ("phase", "mac", "ips", "node", "tap", "observed_generation")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TAP_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    mac: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    node: str
    tap: str
    observed_generation: int
    def __init__(self, phase: _Optional[str] = ..., mac: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ..., node: _Optional[str] = ..., tap: _Optional[str] = ..., observed_generation: _Optional[int] = ...) -> None: ...

class Port(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: PortSpec
    status: PortStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[PortSpec, _Mapping]] = ..., status: _Optional[_Union[PortStatus, _Mapping]] = ...) -> None: ...

class PortList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Port]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[Port, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class PortEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: Port
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[Port, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class RouterSpec(_message.Message):
    __slots__ = ("subnets", "description")
    SUBNETS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    subnets: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, subnets: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class RouterStatus(_message.Message):
    __slots__ = ("phase", "gateway_mac", "nodes", "observed_generation")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_MAC_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    gateway_mac: str
    nodes: _containers.RepeatedScalarFieldContainer[str]
    observed_generation: int
    def __init__(self, phase: _Optional[str] = ..., gateway_mac: _Optional[str] = ..., nodes: _Optional[_Iterable[str]] = ..., observed_generation: _Optional[int] = ...) -> None: ...

class Router(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: RouterSpec
    status: RouterStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[RouterSpec, _Mapping]] = ..., status: _Optional[_Union[RouterStatus, _Mapping]] = ...) -> None: ...

class RouterList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Router]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[Router, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class RouterEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: Router
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[Router, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class SecurityGroupRule(_message.Message):
    __slots__ = ("direction", "protocol", "port_min", "port_max", "remote_cidr", "remote_group", "ethertype", "description")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PORT_MIN_FIELD_NUMBER: _ClassVar[int]
    PORT_MAX_FIELD_NUMBER: _ClassVar[int]
    REMOTE_CIDR_FIELD_NUMBER: _ClassVar[int]
    REMOTE_GROUP_FIELD_NUMBER: _ClassVar[int]
    ETHERTYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    direction: Direction
    protocol: str
    port_min: int
    port_max: int
    remote_cidr: str
    remote_group: str
    ethertype: str
    description: str
    def __init__(self, direction: _Optional[_Union[Direction, str]] = ..., protocol: _Optional[str] = ..., port_min: _Optional[int] = ..., port_max: _Optional[int] = ..., remote_cidr: _Optional[str] = ..., remote_group: _Optional[str] = ..., ethertype: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class SecurityGroupSpec(_message.Message):
    __slots__ = ("rules", "description")
    RULES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[SecurityGroupRule]
    description: str
    def __init__(self, rules: _Optional[_Iterable[_Union[SecurityGroupRule, _Mapping]]] = ..., description: _Optional[str] = ...) -> None: ...

class SecurityGroupStatus(_message.Message):
    __slots__ = ("phase", "ports", "observed_generation")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    ports: int
    observed_generation: int
    def __init__(self, phase: _Optional[str] = ..., ports: _Optional[int] = ..., observed_generation: _Optional[int] = ...) -> None: ...

class SecurityGroup(_message.Message):
    __slots__ = ("metadata", "spec", "status")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    metadata: _meta_pb2.ObjectMeta
    spec: SecurityGroupSpec
    status: SecurityGroupStatus
    def __init__(self, metadata: _Optional[_Union[_meta_pb2.ObjectMeta, _Mapping]] = ..., spec: _Optional[_Union[SecurityGroupSpec, _Mapping]] = ..., status: _Optional[_Union[SecurityGroupStatus, _Mapping]] = ...) -> None: ...

class SecurityGroupList(_message.Message):
    __slots__ = ("items", "resource_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SecurityGroup]
    resource_version: int
    def __init__(self, items: _Optional[_Iterable[_Union[SecurityGroup, _Mapping]]] = ..., resource_version: _Optional[int] = ...) -> None: ...

class SecurityGroupEvent(_message.Message):
    __slots__ = ("type", "object", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: _meta_pb2.EventType
    object: SecurityGroup
    revision: int
    def __init__(self, type: _Optional[_Union[_meta_pb2.EventType, str]] = ..., object: _Optional[_Union[SecurityGroup, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...
