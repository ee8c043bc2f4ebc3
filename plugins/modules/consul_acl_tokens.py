"""Documentation of the action plugin meshvm.mesh.consul_acl_tokens (plugins/action); the work is done there."""

from __future__ import annotations

DOCUMENTATION = r"""
module: consul_acl_tokens
short_description: A VM's two Consul ACL tokens (Consul agent, meshvm agent), made or removed on the controller
description:
  - Makes, corrects or removes the Consul ACL tokens of one VM with an issuer token holding C(acl = "write").
  - The Consul agent's token holds a node identity for the VM's node; meshvm agent's holds a service identity per
    service of the VM and read access to the mesh policy's key prefix and to agents. Neither can register another
    service or write a key.
  - Tokens have fixed accessor IDs (datacenter, node, kind): running again changes nothing and keeps the secrets.
  - Runs on the controller, with the meshvm package importable there. Supports check mode.
options:
  consul_http_addr:
    description: A Consul HTTP API the controller reaches (host:port).
    type: str
    required: true
  issuer_token:
    description: The token that makes the VMs' tokens (acl write); it never goes to a VM.
    type: str
    required: true
  scheme:
    description: http or https.
    type: str
    default: http
    choices: [http, https]
  ca_file:
    description: CA file to check Consul's HTTPS certificate with.
    type: path
  datacenter:
    description: The Consul datacenter of the VM.
    type: str
    required: true
  node:
    description: The VM's Consul node name.
    type: str
    required: true
  services:
    description: Names of the services the VM registers.
    type: list
    elements: str
    default: []
  policy_prefix:
    description: The KV prefix of the mesh policy meshvm's agent reads (meshvm's default when unset).
    type: str
  state:
    description: present makes or corrects the tokens, absent removes them.
    type: str
    default: present
    choices: [present, absent]
author: meshvm
"""

EXAMPLES = r"""
- name: Make this VM's tokens
  meshvm.mesh.consul_acl_tokens:
    consul_http_addr: consul.example.net:8500
    issuer_token: "{{ vault_consul_issuer_token }}"
    datacenter: dc1
    node: "{{ inventory_hostname }}"
    services: [api]
  register: tokens
  no_log: true
"""

RETURN = r"""
consul_agent_token:
  description: The Consul agent's token (secret).
  returned: state=present
  type: str
meshvm_agent_token:
  description: meshvm agent's token (secret).
  returned: state=present
  type: str
made:
  description: The kinds of token made or corrected.
  returned: state=present
  type: list
removed:
  description: The kinds of token removed.
  returned: state=absent
  type: list
"""
