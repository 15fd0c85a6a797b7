"""Serving configs and deployment files; installed as ``guard._assets.deploy`` (see guard/_assets)."""
