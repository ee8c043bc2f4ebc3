"""meshvm's view of Istio: its CA (workload certificates from istiod) and its identity names."""
