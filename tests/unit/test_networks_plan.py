"""The VNI planner (pure)."""

from controller.networks import VNI_MIN, choose_vni


def test_first_free_vni_from_min():
    assert choose_vni(0, 0, {}, "a") == (VNI_MIN, "")
    assert choose_vni(0, 0, {VNI_MIN: "x", VNI_MIN + 1: "y"}, "a") == (VNI_MIN + 2, "")


def test_keeps_current_allocation():
    assert choose_vni(0, 1005, {1005: "a", 1000: "b"}, "a") == (1005, "")


def test_reuses_an_allocation_it_already_holds():
    # e.g. the status write was lost after the claim
    assert choose_vni(0, 0, {1003: "a", 1000: "b"}, "a") == (1003, "")


def test_requested_vni():
    assert choose_vni(42, 0, {}, "a") == (42, "")
    assert choose_vni(42, 1000, {1000: "a"}, "a") == (42, "")


def test_requested_vni_taken_by_another():
    vni, error = choose_vni(42, 0, {42: "b"}, "a")
    assert vni == 0 and "network 'b'" in error


def test_port_nodes_by_binding_or_vm():
    from braid.v1 import network_pb2 as N
    from controller.networks import port_nodes

    def port(net, node="", vm=""):
        return N.Port(spec=N.PortSpec(network=net, node=node, vm=vm))
    ports = {"a": port("blue", node="n1"), "b": port("blue", vm="web"), "c": port("red", vm="lost"),
             "d": port("blue", vm="web")}
    assert port_nodes(ports, {"web": "n2", "lost": ""}) == {"blue": {"n1", "n2"}}
