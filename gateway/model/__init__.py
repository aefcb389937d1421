"""The gateway as a self-hosted ChatKit server's way to the model.

- ``tokens.py``: the model token an admitted turn carries to its ChatKit
  server, and checking it when the server calls the model.
- ``sse.py``: splitting a proxied event stream into events, incrementally.
- ``usage.py``: the usage a model reports, read from its own answer.
- ``routes.py``: the model calls themselves (forwarding with the real key,
  counting what they used).
"""
