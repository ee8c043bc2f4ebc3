"""Envoy v3 resources built as data and written as files Envoy watches (filesystem xDS)."""
