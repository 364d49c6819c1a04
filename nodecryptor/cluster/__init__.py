"""Everything that talks to the Kubernetes API server, and the store its watches fill."""
