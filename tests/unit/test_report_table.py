"""The join/leave/status summary table: every value sits under its own column header."""

from __future__ import annotations

import pytest
from rich.console import Console

from meshvm import cli
from meshvm.join import HostReport


def _rows(printed: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("│┃").split("│" if "│" in line else "┃")]
        for line in printed.splitlines()
        if line.startswith(("│", "┃"))
    ]


@pytest.mark.parametrize("changes", [True, False])
def test_values_line_up_with_their_headers(monkeypatch: pytest.MonkeyPatch, changes: bool) -> None:
    console = Console(width=200, record=True, color_system=None)
    monkeypatch.setattr(cli, "out", console)
    report = HostReport(host="vm1", address="198.51.100.11", services=["web"], changed=7)
    report.consul_checks, report.consul_passing, report.envoy = 4, 3, "LIVE"
    report.kubernetes = ["EndpointSlice/web-vm1 created"]
    healthy = cli._report_table("t", [report], changes=changes)
    header, row = _rows(console.export_text())
    cells = dict(zip(header, row, strict=True))
    assert healthy is True
    assert cells["host"] == "vm1"
    assert cells["consul"] == "3/4 passing"
    assert cells["envoy"] == "LIVE"
    assert cells["kubernetes"] == "EndpointSlice/web-vm1 created"
    assert cells.get("changed") == ("7" if changes else None)


def test_a_failed_host_names_its_step() -> None:
    console = Console(width=200, record=True, color_system=None)
    report = HostReport(
        host="ghost", address="198.51.100.99", services=[], ok=False, step="preflight", error="ssh: timed out"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "out", console)
        assert cli._report_table("t", [report]) is False
    header, row = _rows(console.export_text())
    assert dict(zip(header, row, strict=True))["result"] == "preflight: ssh: timed out"
