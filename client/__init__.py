"""The client side of ``mlynar``: the commands a user types (``apply``, ``get``, ``delete``,
``run …``, ``history``) talking to a Mlynar Events service over its REST API only, so they work the
same against a laptop's ``mlynar serve`` and a remote cluster.

* :mod:`client.http` — settings (``--api``, the token), the HTTP calls, one-line errors and the
  exit codes;
* :mod:`client.models` — the API's JSON shapes this side reads;
* :mod:`client.render` — tables (rich), ``-o json|yaml``;
* :mod:`client.watch` — live progress of a run from its SSE stream;
* :mod:`client.apply` — ``apply -f``: YAML documents to declarations;
* :mod:`client.commands` — the sub-commands and their parsers.

It imports nothing of the service's roles; from :mod:`mlynar_events` only what is pure (the spec
documents' parsing and the configuration rule), see ``tests/test_layers.py``.
"""
