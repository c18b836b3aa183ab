"""qbackend drc: dt output (dts and dtb) and scripted RTAS driving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbackend.app.cli import main
from qbackend.models.spapr.drc import MachineConfig, parse_drc_arrays
from qbackend.models.spapr.fdt import decode

ARGS = ["--cpus", "1", "--maxcpus", "4", "--memory", "1G", "--maxmem", "4G", "--slots", "4"]


def test_dt_dtb_matches_the_model(tmp_path: Path) -> None:
    out = tmp_path / "drc.dtb"
    assert main(["drc", "dt", *ARGS, "--phb", "3", "--format", "dtb", "-o", str(out)]) == 0
    root = decode(out.read_bytes()).root
    cfg = MachineConfig(cpus=1, maxcpus=4, memory=1 << 30, maxmem=4 << 30, slots=4, phbs=(3,))
    for path, arrays in cfg.drc_properties(order="qemu").items():   # the default order
        node = root.find(path)
        assert node is not None and parse_drc_arrays(node.props) == parse_drc_arrays(arrays.as_props())
        assert all(node.props[k] == v for k, v in arrays.as_props().items())
    drmem = root.find("/ibm,dynamic-reconfiguration-memory")
    assert drmem is not None and drmem.props["ibm,dynamic-memory-v2"] == cfg.dynamic_memory_v2()


def test_dt_dts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drc", "dt", *ARGS, "--no-drmem", "--order", "index"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("/dts-v1/;") and "cpus {" in text
    assert "ibm,drc-indexes = <0x04 0x10000000 0x10000001 0x10000002 0x10000003>;" in text
    assert "dynamic-reconfiguration-memory" not in text


def test_dt_rejects_what_qemu_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drc", "dt", "--memory", "300M"]) == 2
    assert "256 MiB" in capsys.readouterr().err


def test_run_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "s.txt"
    script.write_text("""
        # hot-add a core and walk it in
        plug-cpu 2
        set-indicator allocation 0x10000002 1
        set-indicator isolation 0x10000002 1
        configure-connector 0x10000002
        state 0x10000002
        check-exception 0x10000000
        get-power-level -1
        unplug core2
        set-indicator isolation 0x10000002 0
        set-indicator allocation 0x10000002 0
        check-exception
        set-indicator isolation 0x10000099 1
    """)
    assert main(["drc", "run", *ARGS, str(script)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["ok"] for x in lines] == [True] * 12
    assert lines[3]["status"] == 0 and "PowerPC,POWER11@2 {" in lines[3]["dts"]
    assert lines[4]["state"] == "LOGICAL_CONFIGURED"
    assert lines[5]["event"] == {"type": "cpu", "action": "add", "id": "drc-index",
                                 "index": "0x10000002", "count": 0, "plid": 0}
    assert lines[6]["rets"] == [0, 100]
    assert [e["effect"] for e in lines[9]["effects"]] == ["released", "device-removed"]
    assert lines[10]["event"]["action"] == "remove"
    assert lines[11]["rets"] == [0xFFFFFFFD]


def test_run_stops_on_host_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "s.txt"
    script.write_text("unplug core0\nstate 0x10000000\n")
    assert main(["drc", "run", *ARGS, str(script)]) == 1
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(out) == 1 and "Boot CPU" in out[0]["error"]
    assert main(["drc", "run", *ARGS, "--keep-going", str(script)]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 2
