"""Serving without TorchServe: request decoding, metrics through a sink protocol, the request trail."""
