"""`braid cluster up` end to end: real etcd, controller, scheduler and three
nodes of three daemons each, driven through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BRAID = [sys.executable, "-m", "braid.cli.main"]


def braid(data_dir, *args, check=True, timeout=120):
    env = {**os.environ, "BRAID_DATA_DIR": str(data_dir)}
    env.pop("BRAID_SERVER", None)
    out = subprocess.run([*BRAID, *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=str(ROOT))
    if check and out.returncode != 0:
        raise AssertionError(f"braid {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def _cmdlines_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd and "pytest" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_cluster_up_apply_watch_down(tmp_path):
    data = tmp_path / "cluster"
    try:
        up = braid(data, "cluster", "up", "--nodes", "3", "--lease-ttl", "3",
                   "--libvirt-uri", "test:///default")
        assert "Cluster ready" in up.stdout
        state = json.loads((data / "cluster.json").read_text())
        assert len(state["processes"]) == 1 + 2 + 3 * 3

        nodes = json.loads(braid(data, "get", "nodes", "-o", "json").stdout)["items"]
        assert sorted(n["metadata"]["name"] for n in nodes) == ["node1", "node2", "node3"]
        assert all(n["status"]["phase"] == "Ready" for n in nodes)
        assert all({d["name"] for d in n["status"]["daemons"]} == {"node-agent", "storaged", "netd"}
                   for n in nodes)

        # an etcdctl watch started before the apply sees the objects arrive
        pki = Path(state["pki"])   # secure by default: etcd takes only certificates of the cluster
        root = [f"--endpoints=https://{state['etcd']}", f"--cacert={pki / 'ca.crt'}",
                f"--cert={pki / 'users' / 'root.crt'}", f"--key={pki / 'users' / 'root.key'}"]
        plain = subprocess.run(["etcdctl", f"--endpoints={state['etcd']}", "--dial-timeout=2s",
                                "--command-timeout=3s", "get", "--prefix", "/braid/"],
                               capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"})
        assert plain.returncode != 0 and "/braid/" not in plain.stdout
        watch = subprocess.Popen(
            ["etcdctl", *root, "watch", "--prefix", "/braid/"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "ETCDCTL_API": "3"})
        time.sleep(0.5)
        applied = braid(data, "apply", "-f", "examples/")
        assert applied.stdout.count(" created") == 10  # every kind but Node; two VMs
        assert "node/node1 configured" in applied.stdout
        time.sleep(1.0)
        watch.terminate()
        seen = watch.communicate(timeout=10)[0]
        for key in ("/braid/vm/spec/web1", "/braid/volume/spec/vol1", "/braid/network/spec/net1",
                    "/braid/subnet/spec/net1-v4", "/braid/port/spec/web1-eth0",
                    "/braid/router/spec/rt1", "/braid/securitygroup/spec/web",
                    "/braid/diskpool/spec/node1-pool", "/braid/node/spec/node1"):
            assert key in seen, f"{key} not seen by etcdctl watch"

        vms = json.loads(braid(data, "get", "vm", "web1", "-o", "json").stdout)
        assert vms["spec"]["vcpus"] == 1 and vms["metadata"]["labels"] == {"app": "web"}
        table = braid(data, "get", "volumes").stdout
        assert "vol1" in table and "1GiB" in table
        again = braid(data, "apply", "-f", "examples/", "--wait", "30")
        assert again.stdout.count(" unchanged") == 11
        assert "live on every node" in again.stdout   # node1's netd serves the whole machine
        assert "braid:br:net1" in subprocess.run(["ip", "-d", "link", "show", "br-net1"],
                                                 capture_output=True, text=True).stdout

        status = braid(data, "cluster", "status")
        assert "Nodes: 3/3 Ready" in status.stdout and "Leader of scheduler" in status.stdout

        # a node whose agent dies turns NotReady once its lease runs out
        agent = next(p for p in state["processes"] if p["name"] == "node-agent@node2")
        os.kill(agent["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 3 * 3 + 5
        phase = "Ready"
        while time.monotonic() < deadline and phase == "Ready":
            node = json.loads(braid(data, "get", "node", "node2", "-o", "json").stdout)
            phase = node["status"]["phase"]
            time.sleep(0.3)
        assert phase == "NotReady"
        assert json.loads(braid(data, "get", "node", "node1", "-o", "json").stdout)[
            "status"]["phase"] == "Ready"
    finally:
        down = braid(data, "cluster", "down", check=False)
    assert down.returncode == 0, down.stderr
    assert "Cluster stopped" in down.stdout
    assert _cmdlines_mentioning(str(data)) == []
    for p in state["processes"]:
        assert not Path(f"/proc/{p['pid']}").exists() or \
            Path(f"/proc/{p['pid']}/stat").read_text().split(")")[-1].split()[0] == "Z"
    assert braid(data, "get", "nodes", check=False).returncode == 5
    # the local cluster's network data path went with it
    assert "br-net1" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
