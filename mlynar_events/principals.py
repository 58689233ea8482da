"""Who may do what: principals, their roles, their API tokens, and who may use a machine.

One place for these rules, because three roles need them: the API (which principal a bearer token
is, whether its role may call a route, which runs a member sees), the solver (a step carries the
run's owner) and the executor (a step runs on a machine only if the run's owner may use it).

* **Roles**, weakest first: ``viewer`` reads everything; ``member`` also creates and drives *its
  own* runs (it sees no other run) and registers *its own* machines; ``admin`` does everything
  (the registry, every machine, tokens, webhooks). :meth:`Role.allows` is the order.
* **Tokens** are ``mlt_`` + 32 random bytes (URL-safe base64), shown once when created. Only their
  SHA-256 is kept (in the ``TokenCreated`` event and the ``tokens`` view): a token is random
  enough that a fast hash is safe, and a reader of the stream or the views learns nothing usable.
  The bootstrap token of ``--api-token-file`` is the principal :data:`BOOTSTRAP_ADMIN`.
* **Anonymous**: without any token configured the API is only served on loopback (or with
  ``--insecure-no-auth``); its callers are :data:`ANONYMOUS`, an admin, as the local user is.
* **Machines** have an owner (who registered them) and ``shared_with`` (principal names, or
  ``"*"`` for everyone). :func:`may_use_machine` is the rule; facts written before principals
  existed (no owner) keep their old meaning: usable by every run.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from .names import is_dns1123_label

TOKEN_PREFIX = "mlt_"
EVERYONE = "*"


class Role(StrEnum):
    VIEWER = "viewer"
    MEMBER = "member"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return ("viewer", "member", "admin").index(self.value)

    def allows(self, needed: "Role") -> bool:
        """A role may do what any weaker role may."""
        return self.rank >= needed.rank


@dataclass(frozen=True)
class Principal:
    """Who a request is: the name every event it causes carries as its ``actor``."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def owns(self, owner: str | None) -> bool:
        """A member acts on what it owns; an admin or viewer is not limited to its own (a
        viewer's writes are refused by role before ownership matters). ``owner`` ``None``: a
        run or machine from before principals existed, an admin's alone."""
        return self.role is not Role.MEMBER or owner == self.name


BOOTSTRAP_ADMIN = Principal("admin", Role.ADMIN)
"""The holder of ``--api-token-file``'s token."""
ANONYMOUS = Principal("anonymous", Role.ADMIN)
"""Every caller of an API that has no token configured (loopback only, or ``--insecure-no-auth``)."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What is kept of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token_id() -> str:
    return "tok-" + secrets.token_hex(6)


def check_principal_name(name: str) -> str | None:
    """Why ``name`` cannot name a principal, or ``None``: DNS-1123 labels (they appear in
    machine sharing lists, actors and URLs); the built-in names are taken."""
    if not is_dns1123_label(name):
        return f"principal {name!r} is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)"
    if name in {BOOTSTRAP_ADMIN.name, ANONYMOUS.name}:
        return f"principal name {name!r} is reserved"
    return None


ADMIN_AGGREGATES = frozenset({"token", "webhook"})
"""Events only an admin sees (on the event streams and in webhooks): their routes are admin's
too, or a member's own webhooks', which it reads through the API."""


def may_see(who: Principal, aggregate: str, run_owner: str | None = None) -> bool:
    """Whether ``who`` may see an event of ``aggregate`` (for a run event: of a run owned by
    ``run_owner``): an admin everything; a viewer all but :data:`ADMIN_AGGREGATES`; a member the
    same, of runs only its own. The SSE streams (``api/principal.py``) and the webhook
    dispatcher (``integrations/webhooks.py``) both apply this."""
    if who.is_admin:
        return True
    if aggregate in ADMIN_AGGREGATES:
        return False
    return aggregate != "run" or who.owns(run_owner)


def may_use_machine(run_owner: str | None, machine_owner: str | None, shared_with: list[str] | tuple[str, ...]) -> bool:
    """A step may run on a machine only if the run's owner owns the machine or it is shared with
    them (or with everyone). Runs and machines from before principals existed (owner ``None``)
    are not restricted."""
    if run_owner is None or machine_owner is None:
        return True
    return run_owner == machine_owner or EVERYONE in shared_with or run_owner in shared_with


def machine_refusal(machine: str, run_owner: str | None, machine_owner: str | None) -> str:
    """The reason a step fails when :func:`may_use_machine` says no."""
    return (f"machine {machine!r} belongs to {machine_owner!r} and is not shared with {run_owner!r}, "
            "the run's owner (its owner or an admin can share it: PUT /api/machines/{name} sharedWith)")
