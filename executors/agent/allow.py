"""What a step may run: the command resolved and checked against ``--allow``, and the manifest
variables no step may set. The one place these rules live; :mod:`.runner` asks
:meth:`CommandPolicy.check` before a step starts and fails the step (``retryable=False``) when it
refuses.

Why resolved paths: matching the text of a command line lets ``python3 /dir/../evil.py`` or a
symlink ``/dir/x -> /elsewhere`` through a pattern ``python3 /dir/*``. So the program is looked
up on the **agent's** ``PATH`` (never the manifest's: a manifest cannot set ``PATH``), and every
argument that names a path is replaced by its real path (symlinks and ``..`` resolved, relative
paths against the step's working directory) before the patterns are matched.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mlynar.agent")

#: Variables that change what a program loads or runs before its own code (the dynamic loader,
#: interpreters' module paths and start-up hooks, shells' start-up files): a manifest may not set
#: them, because with them an allowed command runs something else.
FORBIDDEN_ENV = frozenset({
    "PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4",
    "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF",
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
    "PYTHONPLATLIBDIR", "PYTHONINSPECT", "PYTHONBREAKPOINT",
    "PERL5LIB", "PERLLIB", "PERL5OPT", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS", "NODE_PATH",
    "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
    "LUA_PATH", "LUA_CPATH", "TCLLIBPATH", "R_PROFILE", "R_PROFILE_USER", "R_LIBS", "R_LIBS_USER",
    # Python imports a warning category's module, and reads cached bytecode from the prefix
    "PYTHONWARNINGS", "PYTHONPYCACHEPREFIX",
    # programs an allowed tool may start by itself (a pager, an editor, less's input filter)
    "PAGER", "GIT_PAGER", "MANPAGER", "EDITOR", "VISUAL", "BROWSER", "LESSOPEN", "LESSCLOSE",
    # configuration files that can name programs or modules to load
    "CURL_HOME", "WGETRC", "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "TERMINFO", "TERMINFO_DIRS",
    "SSLKEYLOGFILE",
})
#: Prefixes of such variables: dynamic loaders (glibc ``LD_*``, macOS ``DYLD_*``), OpenSSL's
#: configuration, providers and engines (``OPENSSL_CONF`` loads a shared object into any program
#: using libcrypto), exported bash functions (``BASH_FUNC_name%%`` replaces a command inside
#: any bash script), git's configuration from the environment (``GIT_CONFIG_*`` can set hooks
#: and programs), and Perl/Ruby/Node start-up options. A deny list is a best effort on top of the
#: real boundary, the isolation (docs/AGENT.md).
FORBIDDEN_ENV_PREFIXES = ("LD_", "DYLD_", "OPENSSL_", "BASH_FUNC_", "GIT_", "PERL5", "RUBY", "NODE_")


class Refusal(Exception):
    """The step may not run; the message says why, for the user. ``retryable`` is False when the
    same manifest is refused again (every refusal of the policy, except a program that is not
    installed yet)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def forbidden_env(env: dict[str, str]) -> list[str]:
    """The names in ``env`` a manifest may not set, sorted."""
    return sorted(k for k in env if k in FORBIDDEN_ENV or k.startswith(FORBIDDEN_ENV_PREFIXES))


def find_program(name: str, path: str, cwd: Path) -> str | None:
    """The absolute path of the program ``name``: a name with a ``/`` is taken as a path
    (relative to ``cwd``), any other is looked up on ``path`` (the agent's own ``PATH``). ``None``
    unless it is an executable file."""
    if "/" in name:
        candidate = os.path.join(cwd, name)
        return os.path.abspath(candidate) if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None
    found = shutil.which(name, path=path)
    return os.path.abspath(found) if found else None


def _is_path(arg: str) -> bool:
    """A ``/`` makes a path, unless it is a URL or has whitespace (a script; ``shlex.join`` quotes
    such an argument, so it can never match an unquoted path pattern either)."""
    return "/" in arg and "://" not in arg and not any(c.isspace() for c in arg)


def _real(arg: str, cwd: Path) -> str:
    return os.path.realpath(os.path.join(cwd, arg))


def normalise_arg(arg: str, cwd: Path) -> str:
    """An argument as the patterns see it: a path (see :func:`_is_path`) by its real path; ``--opt=PATH`` by ``--opt=`` and the real path; anything else as it is."""
    if arg.startswith("-"):
        opt, eq, value = arg.partition("=")
        return opt + eq + _real(value, cwd) if eq and _is_path(value) else arg
    return _real(arg, cwd) if _is_path(arg) else arg


@dataclass(frozen=True)
class _Pattern:
    text: str  # as given on the command line
    program: str | None  # real path of the pattern's program, or a glob over real paths
    glob: bool
    rest: str  # fnmatch pattern over the shell-quoted normalised arguments

    def matches(self, program_real: str, args_line: str) -> bool:
        if self.program is None:
            return False
        if self.glob:
            if not fnmatch.fnmatchcase(program_real, self.program):
                return False
        elif program_real != self.program:
            return False
        return fnmatch.fnmatchcase(args_line, self.rest)


@dataclass(frozen=True)
class Command:
    """A command that passed the policy: ``argv[0]`` is the program's absolute path (what is
    executed), the arguments are as the manifest gave them; ``checked`` is the line the patterns
    were matched against."""

    argv: list[str]
    checked: str


class CommandPolicy:
    """``--allow`` patterns and the forbidden variables, decided once at start.

    A pattern is ``PROGRAM ARGS-PATTERN``: ``PROGRAM`` is resolved like a step's program (on the
    agent's ``PATH``, then to its real path; a pattern with glob characters there is matched
    against the real path instead), ``ARGS-PATTERN`` is an ``fnmatch`` pattern over the
    shell-quoted (``shlex.join``) normalised arguments. No patterns: every program may run."""

    def __init__(self, patterns: list[str], path: str) -> None:
        self.path = path
        self.texts = list(patterns)
        self.patterns = [self._parse(p) for p in patterns]

    def _parse(self, text: str) -> _Pattern:
        head, _, rest = text.strip().partition(" ")
        rest = rest.strip()
        if any(c in head for c in "*?["):
            return _Pattern(text, head, True, rest)
        found = find_program(head, self.path, Path("/")) if head else None
        if found is None:
            log.warning("--allow pattern %r: program %r is not an executable on the agent's PATH; "
                        "the pattern matches nothing", text, head)
            return _Pattern(text, None, False, rest)
        return _Pattern(text, os.path.realpath(found), False, rest)

    def check(self, argv: list[str], env: dict[str, str], cwd: Path) -> Command:
        """The command to execute, or :class:`Refusal`."""
        bad = forbidden_env(env)
        if bad:
            raise Refusal(f"the manifest sets {', '.join(bad)}: a step may not set the program search path "
                          "or dynamic loader and interpreter start-up variables")
        program = find_program(argv[0], self.path, cwd)
        if program is None:
            raise Refusal(f"cannot start command {shlex.join(argv)!r}: program {argv[0]!r} is not an executable "
                          "file on the agent's PATH", retryable=True)
        program_real = os.path.realpath(program)
        args_line = shlex.join(normalise_arg(a, cwd) for a in argv[1:])
        checked = shlex.join([program_real]) + (" " + args_line if args_line else "")
        if self.patterns and not any(p.matches(program_real, args_line) for p in self.patterns):
            raise Refusal(f"command {shlex.join(argv)!r} (resolved: {checked!r}) is not allowed by "
                          f"--allow patterns {self.texts!r}")
        return Command([program, *argv[1:]], checked)
