"""`meshvm agent`: registers this VM's services in Consul, watches the mesh and drives Envoy through files."""
