"""Kubernetes side of meshvm: registering VM workloads and the least-privilege identity that does it."""
