"""The node agent's VM planner (pure): every power-state transition."""

import pytest

from braid.v1 import compute_pb2, meta_pb2
from node_agent.hypervisor import Domain
from node_agent.vms import Action, plan

NODE = "n1"


def vm(power=compute_pb2.RUNNING, node=NODE, generation=1, vcpus=1, memory=128):
    return compute_pb2.VM(
        metadata=meta_pb2.ObjectMeta(name="v", generation=generation),
        spec=compute_pb2.VMSpec(vcpus=vcpus, max_vcpus=4, memory_mib=memory, max_memory_mib=512,
                                power_state=power, node=node))


def dom(state="running", generation=1, vcpus=1, memory=128):
    return Domain(vm="v", state=state, vcpus=vcpus, memory_mib=memory, generation=generation,
                  uid="", persistent=True, xml="")


def ops(p):
    return [a.op for a in p.actions]


def test_new_vm_is_defined_and_started():
    p = plan(vm(), NODE, None, None, 0, 30)
    assert ops(p) == ["define", "start"] and p.phase == "Running"


def test_running_vm_in_sync_needs_nothing():
    assert plan(vm(), NODE, dom(), None, 0, 30).actions == []


def test_changed_spec_is_redefined_and_hot_added():
    p = plan(vm(generation=2, vcpus=2, memory=256), NODE, dom(generation=1), None, 0, 30)
    assert p.actions == [Action("define"), Action("set_vcpus", 2), Action("set_memory", 256)]


def test_balloon_rounding_is_tolerated():
    assert plan(vm(memory=128), NODE, dom(memory=127), None, 0, 30).actions == []


@pytest.mark.parametrize("state,expected", [
    ("shutoff", ["start"]), ("crashed", ["start"]), ("paused", ["resume"]),
])
def test_bring_to_running(state, expected):
    assert ops(plan(vm(), NODE, dom(state=state), None, 0, 30)) == expected


def test_pause_and_start_paused():
    assert ops(plan(vm(power=compute_pb2.PAUSED), NODE, dom(), None, 0, 30)) == ["suspend"]
    assert ops(plan(vm(power=compute_pb2.PAUSED), NODE, dom(state="shutoff"), None, 0, 30)) == \
        ["start_paused"]
    assert plan(vm(power=compute_pb2.PAUSED), NODE, dom(state="paused"), None, 0, 30).actions == []


def test_stop_asks_acpi_then_powers_off_after_timeout():
    v = vm(power=compute_pb2.STOPPED)
    p = plan(v, NODE, dom(), None, 100, 30)
    assert ops(p) == ["shutdown"] and p.phase == "Stopping" and p.requeue_after == 2.0
    p = plan(v, NODE, dom(), 100, 110, 30)
    assert p.actions == [] and p.phase == "Stopping" and p.requeue_after == 2.0
    p = plan(v, NODE, dom(), 100, 129, 30)
    assert p.actions == [] and p.requeue_after == pytest.approx(1.0)
    p = plan(v, NODE, dom(), 100, 130, 30)
    assert ops(p) == ["destroy"] and "ignored ACPI" in p.message
    assert plan(v, NODE, dom(state="shutoff"), 100, 131, 30).phase == "Stopped"


def test_deleted_or_moved_vm_is_removed_here():
    assert ops(plan(None, NODE, dom(), None, 0, 30)) == ["destroy", "undefine"]
    assert ops(plan(None, NODE, dom(state="shutoff"), None, 0, 30)) == ["undefine"]
    assert ops(plan(vm(node="other"), NODE, dom(), None, 0, 30)) == ["destroy", "undefine"]
    assert plan(None, NODE, None, None, 0, 30).actions == []
    assert plan(vm(node="other"), NODE, None, None, 0, 30).actions == []


def test_fenced_node_powers_off_and_starts_nothing():
    p = plan(vm(), NODE, dom(), None, 0, 30, fenced=True)
    assert ops(p) == ["destroy"] and p.phase == "Fenced"
    assert plan(vm(), NODE, None, None, 0, 30, fenced=True).actions == []
    assert plan(vm(), NODE, dom(state="shutoff"), None, 0, 30, fenced=True).actions == []


def test_never_started_while_another_live_node_holds_it():
    p = plan(vm(), NODE, None, None, 0, 30, held_by="n2")
    assert p.actions == [] and "n2" in p.message
    # once migrated here (the domain exists), it is ours to converge
    assert plan(vm(), NODE, dom(), None, 0, 30, held_by="n2").actions == []
    assert ops(plan(vm(vcpus=2), NODE, dom(), None, 0, 30, held_by="n2")) == ["set_vcpus"]


def test_moved_vm_is_migrated_when_the_target_takes_migrations():
    p = plan(vm(node="n2"), NODE, dom(), None, 0, 30, can_migrate=True)
    assert ops(p) == ["migrate"] and p.phase == "Migrating"
    # a stopped domain is simply handed over (removed here, defined there)
    assert ops(plan(vm(node="n2"), NODE, dom(state="shutoff"), None, 0, 30, can_migrate=True)) \
        == ["undefine"]
    assert ops(plan(vm(node="n2"), NODE, dom(), None, 0, 30, fenced=True, can_migrate=True)) \
        == ["destroy", "undefine"]


def test_stale_copy_of_a_vm_that_ha_restarted_elsewhere_is_destroyed_not_migrated():
    v = vm(node="n2")
    v.status.node = "n2"     # n2's agent already runs it (HA moved it while we were gone)
    assert ops(plan(v, NODE, dom(), None, 0, 30, can_migrate=True)) == ["destroy", "undefine"]


def test_cancelled_incoming_migration_is_left_to_libvirt():
    v = vm(node="n2")        # moved back to its source: the migration here is being cancelled
    v.status.node = "n2"
    v.status.migration.phase = "Running"
    v.status.migration.target_node = NODE
    p = plan(v, NODE, dom(state="paused"), None, 0, 30, can_migrate=True)
    assert p.actions == [] and p.hands_off


def test_incoming_migration_is_left_to_libvirt():
    v = vm()
    v.status.node = "n2"
    v.status.migration.phase = "Running"
    v.status.migration.target_node = NODE
    for d in (None, dom(state="paused"), dom(state="shutoff", generation=0)):
        p = plan(v, NODE, d, None, 0, 30, held_by="n2")
        assert p.actions == [] and p.phase == "Migrating" and p.hands_off
    v.status.migration.phase = "Completed"
    assert plan(v, NODE, dom(), None, 0, 30, held_by="n2").actions == []


def test_disks_and_nics_are_hot_plugged_to_match_the_spec():
    v = vm(generation=2)
    v.spec.disks.add(name="vda", path="/d/a.img")
    v.spec.disks.add(name="vdb", path="/d/b.img")
    v.spec.nics.add(name="eth0", bridge="br0")
    d = Domain(vm="v", state="running", vcpus=1, memory_mib=128, generation=1, uid="",
               persistent=True, xml="", disks=("vda", "vdc"), nics=())
    p = plan(v, NODE, d, None, 0, 30)
    assert [(a.op, a.ref) for a in p.actions] == [
        ("define", ""), ("detach_disk", "vdc"), ("attach_disk", "vdb"), ("attach_nic", "bt-v_eth0")]
    # a stopped domain only gets the new definition
    stopped = Domain(vm="v", state="shutoff", vcpus=1, memory_mib=128, generation=1, uid="",
                     persistent=True, xml="", disks=("vda",), nics=())
    assert ops(plan(v, NODE, stopped, None, 0, 30)) == ["define", "start"]
