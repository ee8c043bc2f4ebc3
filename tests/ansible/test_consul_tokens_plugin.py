"""The action plugin meshvm.mesh.consul_acl_tokens: its argument spec and its documentation say the same thing."""

from __future__ import annotations

from tests.ansible import modules
from tests.ansible.argspec import REPO


def test_the_documented_options_are_the_plugins_arguments() -> None:
    action = modules.load(REPO / "plugins" / "action" / "consul_acl_tokens.py")
    _docs, documented = modules.documentation(REPO / "plugins" / "modules" / "consul_acl_tokens.py")
    modules.assert_documented(documented, action.ARGS)
    assert action.ARGS["issuer_token"]["no_log"] is True
