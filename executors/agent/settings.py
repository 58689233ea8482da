"""Settings of ``mlynar machine-agent`` (every field is also a CLI flag, see :mod:`.cli`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mlynar_events.netaddr import is_loopback as is_loopback_host

DEFAULT_PORT = 5555
DEFAULT_MAX_INPUT_BYTES = 4 * 1024**3


def default_memory_bytes() -> int:
    """The host's physical memory: one step's process may not take more than the machine has."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def default_max_parallel() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class AgentConfigError(Exception):
    """The settings do not allow the agent to start (the CLI exits with code 2)."""


class AgentSettings(BaseModel):
    """Configuration of one agent. Embed with :func:`executors.agent.start_agent`.

    The isolation defaults here (``isolation="none"``, no user change) are an embedding program's:
    it decides what its steps need to see (``mlynar serve``'s built-in machine runs the registry's
    scripts). ``mlynar machine-agent`` starts from :class:`MachineAgentSettings`, which isolates."""

    model_config = ConfigDict(validate_assignment=True)

    # every field but the last two is a flag of `mlynar machine-agent` (see .cli), its help the description
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    token: SecretStr | None = Field(None, description="bearer token clients must send (prefer MLYNAR_TOKEN or --token-file)")
    token_file: Path | None = Field(None, description="file holding the bearer token")
    insecure_no_auth: bool = Field(False, description="run without a token; only accepted with a loopback --host")
    work_dir: Path = Field(Path(".mlynar-agent"), description="where step sandboxes live")
    allow: list[str] = Field(default_factory=list, description="fnmatch pattern over the shell-quoted command line "
                             "(shlex.join(argv)); when given, only matching commands run")
    max_parallel: int = Field(default_factory=default_max_parallel, ge=1, description="steps running at once (others queue)")
    result_ttl: float = Field(default=0.0, description="seconds a finished step's sandbox is kept unless deleted "
                              "earlier (<= 0: until the executor deletes it, which it does once it stored the outcome)")
    max_input_bytes: int = Field(default=DEFAULT_MAX_INPUT_BYTES, ge=0,
                                 description="largest accepted upload of one step (413 above)")
    max_manifest_bytes: int = Field(default=1024**2, ge=1)
    kill_grace: float = Field(default=5.0, ge=0, description="seconds between SIGTERM and SIGKILL on timeout")
    isolation: Literal["auto", "bwrap", "none"] = Field(
        "none", description="how steps are confined: bwrap (Bubblewrap: private filesystem view and PID namespace), "
        "none (a process tree the agent sweeps, no filesystem confinement) or auto (bwrap when it works here)")
    run_as_user: str = Field("", description="when the agent runs as root, steps run as this user ('' = as root)")
    read: list[Path] = Field(default_factory=list, description="host path steps may read (bwrap: bound read-only)")
    write: list[Path] = Field(default_factory=list, description="host path steps may read and write (bwrap: bound "
                              "read-write)")
    network: bool = Field(True, description="steps may use the network (--no-network: bwrap gives them only a "
                          "private loopback)")
    limit_cpu_seconds: int = Field(86400, ge=0, description="CPU seconds per step process (RLIMIT_CPU; 0 = no limit)")
    limit_memory_bytes: int = Field(default_factory=default_memory_bytes, ge=0,
                                    description="data memory per step process (RLIMIT_DATA; 0 = no limit)")
    limit_processes: int = Field(4096, ge=0, description="processes and threads of the steps' user (RLIMIT_NPROC; "
                                 "0 = no limit)")
    limit_file_bytes: int = Field(64 * 1024**3, ge=0, description="largest file a step may write (RLIMIT_FSIZE; "
                                  "0 = no limit)")

    def resolve_token(self) -> str | None:
        """The bearer token, from ``token`` or ``token_file``; ``None`` only when running without
        auth is allowed. Raises :class:`AgentConfigError` with a message for the user otherwise."""
        if self.token is not None and self.token_file is not None:
            raise AgentConfigError("give either --token or --token-file, not both")
        token: str | None = None
        if self.token is not None:
            token = self.token.get_secret_value().strip()
            if not token:
                raise AgentConfigError("--token is empty")
        elif self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise AgentConfigError(f"cannot read --token-file {str(self.token_file)!r}: {e.strerror or e}") from e
            except UnicodeDecodeError as e:
                raise AgentConfigError(f"--token-file {str(self.token_file)!r} is not UTF-8 text") from e
            if not token:
                raise AgentConfigError(f"--token-file {str(self.token_file)!r} is empty")
        if token is not None:
            return token
        if not self.insecure_no_auth:
            raise AgentConfigError(
                "refusing to start without a bearer token: give --token or --token-file "
                "(or MLYNAR_TOKEN / MLYNAR_TOKEN_FILE); --insecure-no-auth allows running without "
                "one on a loopback --host only"
            )
        if not is_loopback_host(self.host):
            raise AgentConfigError(
                f"refusing to start without a bearer token on non-loopback --host {self.host!r}: "
                "--insecure-no-auth is only accepted with a loopback host (127.0.0.1, ::1, localhost); "
                "give --token or --token-file"
            )
        return None


class MachineAgentSettings(AgentSettings):
    """The defaults of ``mlynar machine-agent``: a host running other people's steps isolates them
    (Bubblewrap when it works here) and, when the agent is root, runs them as ``nobody``."""

    isolation: Literal["auto", "bwrap", "none"] = Field(
        "auto", description=AgentSettings.model_fields["isolation"].description)
    run_as_user: str = Field("nobody", description=AgentSettings.model_fields["run_as_user"].description)
