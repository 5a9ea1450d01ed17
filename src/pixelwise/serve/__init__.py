"""Serve trained models over HTTP: a REST API and a web page (``pixelwise serve``)."""

from pixelwise.serve.app import ServeLimits, create_app, load_models

__all__ = ["ServeLimits", "create_app", "load_models"]
