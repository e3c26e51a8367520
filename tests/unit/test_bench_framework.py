"""Tests of the benchmark framework (bench/) with a temporary results dir."""
from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import framework  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.framework import Metric  # noqa: E402

FAKE_DOC = "Fake section used by the framework tests."


def _fake_module(name: str, run, doc: str = FAKE_DOC) -> types.ModuleType:
    module = types.ModuleType(f"fake_sections.{name}", doc)
    module.run = run
    return module


def _ok_run(ctx):
    assert ctx.tmp_dir.is_dir()
    (ctx.tmp_dir / "scratch").write_text("x")  # the tmp dir is writable
    return [
        Metric("fast.ops", 300.0, "ops/s", "slow.ops", 120.0, True, {"size": 10 if ctx.quick else 1000}),
        Metric("latency", 2.5, "ms", higher_is_better=False, params={"quick": ctx.quick}),
    ]


def _boom_run(ctx):
    raise RuntimeError("disk on fire")


@pytest.fixture
def results(tmp_path, monkeypatch):
    out = tmp_path / "results"
    monkeypatch.setenv(framework.RESULTS_ENV, str(out))
    registered = []

    def register(name, run):
        framework.register_section(_fake_module(name, run))
        registered.append(name)

    yield out, register
    for name in registered:
        framework.unregister_section(name)


def test_ratio_is_value_over_baseline():
    assert Metric("a", 300.0, "ops/s", "b", 120.0).ratio == pytest.approx(2.5)
    assert Metric("a", 1.0, "ms", "b", 4.0, False).ratio == pytest.approx(0.25)
    assert Metric("a", 1.0, "ms").ratio is None
    assert Metric("a", 1.0, "ms", "b", 0.0).ratio is None  # no division by zero
    with pytest.raises(TypeError):
        Metric("a", 1.0, "ms", ratio=3.0)  # computed, not passed


def test_results_dir_env_and_parameter(tmp_path, monkeypatch):
    monkeypatch.delenv(framework.RESULTS_ENV, raising=False)
    assert framework.results_dir() == ROOT / "bench" / "results"
    monkeypatch.setenv(framework.RESULTS_ENV, str(tmp_path / "env"))
    assert framework.results_dir() == tmp_path / "env"
    assert framework.results_dir(tmp_path / "arg") == tmp_path / "arg"


def test_measure_median_and_p95():
    ctx = framework.SectionContext(quick=True, tmp_dir=Path("."))
    calls = []
    delays = iter([0.0] + [0.001] * 19 + [0.02])  # warm-up, 19 fast, 1 slow

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    t = ctx.measure(fn, repeat=20)
    assert len(calls) == 21 and t.samples == 20
    assert 0.001 <= t.median < 0.01
    assert t.p95 < 0.01  # nearest-rank p95 of 20 samples is the 19th, not the max
    assert t.median <= t.p95
    with pytest.raises(ValueError):
        ctx.measure(fn, repeat=0)


def test_section_json_and_report(results):
    out, register = results
    register("fakeok", _ok_run)
    assert "fakeok" in framework.section_names()
    assert "encoding" in framework.section_names()  # discovered with pkgutil

    assert main(["--section", "fakeok", "--quick"]) == 0
    data = json.loads((out / "fakeok.json").read_text())
    assert data == [
        {"name": "fast.ops", "value": 300.0, "unit": "ops/s", "baseline_name": "slow.ops",
         "baseline_value": 120.0, "ratio": 2.5, "higher_is_better": True, "params": {"size": 10}},
        {"name": "latency", "value": 2.5, "unit": "ms", "baseline_name": None,
         "baseline_value": None, "ratio": None, "higher_is_better": False,
         "params": {"quick": True}},
    ]
    report = (out / "report.md").read_text()
    assert "## fakeok" in report and FAKE_DOC in report
    assert "| fast.ops | 300 ops/s | slow.ops | 120 ops/s | 2.500 | higher | size=10 |" in report
    assert "| latency | 2.5 ms | — | — | — | lower | quick=True |" in report
    for key in ("CPU", "cores", "memory", "python", "date"):
        assert f"| {key} |" in report


def test_report_keeps_other_sections(results):
    out, register = results
    register("fakeok", _ok_run)
    register("other", lambda ctx: [Metric("other.m", 7.0, "s", higher_is_better=False)])
    assert main(["--section", "fakeok"]) == 0
    assert main(["--section", "other"]) == 0
    report = (out / "report.md").read_text()
    assert "## fakeok" in report and "## other" in report
    assert "size=1000" in report  # fakeok's (non-quick) row survived the second run
    assert "| other.m | 7 s | — | — | — | lower | — |" in report


def test_unknown_section_exit_2(results, capsys):
    out, _ = results
    assert main(["--section", "nope"]) == 2
    assert "unknown section(s): nope" in capsys.readouterr().err
    assert not out.exists()  # nothing ran


def test_failing_section_exit_1_others_still_run(results, capsys):
    out, register = results
    register("aaboom", _boom_run)  # sorts first: runs before fakeok
    register("fakeok", _ok_run)
    assert main(["--section", "aaboom", "--section", "fakeok"]) == 1
    err = capsys.readouterr().err
    assert "disk on fire" in err and "aaboom FAILED" in err
    assert (out / "fakeok.json").exists()
    assert not (out / "aaboom.json").exists()
    report = (out / "report.md").read_text()
    assert "## aaboom — FAILED" in report and "RuntimeError: disk on fire" in report
    assert "| fast.ops |" in report

    # once it passes again the failure record is gone from the report
    register("aaboom", _ok_run)
    assert main(["--section", "aaboom"]) == 0
    assert not (out / "aaboom.error.json").exists()
    assert "FAILED" not in (out / "report.md").read_text()


def test_bad_return_value_is_a_failure(results):
    out, register = results
    register("badret", lambda ctx: {"not": "a list"})
    assert main(["--section", "badret"]) == 1
    assert "TypeError" in (out / "badret.error.json").read_text()


def test_list_sections(results, capsys):
    _, register = results
    register("fakeok", _ok_run)
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fakeok") and FAKE_DOC in line for line in lines)
    assert any(line.startswith("encoding") for line in lines)


def test_encoding_section_quick(results):
    out, _ = results
    assert main(["--section", "encoding", "--quick"]) == 0
    metrics = {m["name"]: m for m in json.loads((out / "encoding.json").read_text())}
    assert set(metrics) == {"json.encode", "json.decode", "json.roundtrip", "json.size",
                            "typed_json.encode", "typed_json.decode", "typed_json.size"}
    typed = metrics["typed_json.size"]
    assert typed["baseline_name"] == "typed_protobuf.size" and typed["value"] > typed["baseline_value"]
    for op in ("encode", "decode", "roundtrip"):
        m = metrics[f"json.{op}"]
        assert m["unit"] == "ops/s" and m["higher_is_better"] is True
        assert m["baseline_name"] == f"protobuf_struct.{op}"
        assert m["value"] > 0 and m["baseline_value"] > 0
        assert m["ratio"] == pytest.approx(m["value"] / m["baseline_value"])
    size = metrics["json.size"]
    assert size["higher_is_better"] is False and size["unit"] == "bytes"
    assert 400 <= size["value"] <= 600  # ~500-byte VM spec
