"""chatkit-gateway: an authenticating, rate-limiting reverse proxy for OpenAI ChatKit."""

__version__ = "0.1.0"
