"""Action plugin meshvm.mesh.consul_acl_tokens: a VM's two Consul ACL tokens, made or removed on the controller.

It runs in the controller's ansible-playbook process (nothing is sent to the host) through meshvm's own code
(meshvm.consul.tokens), so `meshvm join` and the playbooks make the same tokens. The issuer token is read only here.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

try:
    from meshvm.config import ConsulSpec
    from meshvm.consul import tokens
    from meshvm.consul.client import ConsulClient
    from meshvm.errors import MeshvmError
except ImportError as exc:  # pragma: no cover - depends on the controller's environment
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

ARGS = {
    "consul_http_addr": {"type": "str", "required": True},
    "issuer_token": {"type": "str", "required": True, "no_log": True},
    "scheme": {"type": "str", "default": "http", "choices": ["http", "https"]},
    "ca_file": {"type": "path"},
    "datacenter": {"type": "str", "required": True},
    "node": {"type": "str", "required": True},
    "services": {"type": "list", "elements": "str", "default": []},
    "policy_prefix": {"type": "str"},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
}


class ActionModule(ActionBase):  # type: ignore[misc]
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = super().run(tmp, task_vars)
        if _IMPORT_ERROR is not None:
            raise AnsibleActionFail(
                f"the meshvm package is not importable on the controller ({_IMPORT_ERROR}): run ansible-playbook "
                "from the virtualenv meshvm is installed in"
            )
        _spec, args = self.validate_argument_spec(argument_spec=ARGS)
        check = bool(self._task.check_mode)
        try:
            spec = ConsulSpec.model_validate(
                {"http_addr": args["consul_http_addr"], "scheme": args["scheme"], "ca_file": args["ca_file"]}
                | ({"policy_prefix": args["policy_prefix"]} if args["policy_prefix"] else {})
            )
            client = ConsulClient(spec, args["issuer_token"])
            if args["state"] == "absent":
                removed = tokens.remove(client, args["datacenter"], args["node"], check=check)
                return result | {"changed": bool(removed), "removed": removed}
            issued = tokens.ensure(
                client, args["datacenter"], args["node"], args["services"], spec.policy_prefix, check=check
            )
        except (MeshvmError, ValueError) as exc:
            raise AnsibleActionFail(f"Consul ACL tokens of {args['node']}: {exc}") from exc
        # The result holds secrets: censored in every callback, as with no_log (a failure above stays readable).
        return result | {
            "_ansible_no_log": True,
            "changed": bool(issued.changed),
            "made": issued.changed,
            "consul_agent_token": issued.secrets[tokens.CONSUL_AGENT],
            "meshvm_agent_token": issued.secrets[tokens.MESHVM_AGENT],
        }
