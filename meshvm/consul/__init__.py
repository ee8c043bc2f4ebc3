"""meshvm's one way to speak to Consul.

* :mod:`meshvm.consul.client`: the HTTP API over py-consul, for what is done once (register, deregister, read a
  node's health, write the policy with check-and-set, create ACL tokens); every failure becomes
  :class:`~meshvm.errors.PeerUnreachableError` or :class:`~meshvm.errors.OperationFailedError`.
* :mod:`meshvm.consul.watch`: blocking queries, one asyncio loop for every watch of the agent.
* :mod:`meshvm.consul.parse`: Consul's JSON to snapshot values.
"""
