"""
What a task's spec may ask for when C{[security] allowed_commands} is set.

C{allowed_commands} is checked against the command string only.  That
string runs through C{/bin/sh -c}, in an environment that the spec extends:
a variable such as C{BASH_ENV}, C{PATH} or C{LD_PRELOAD} changes what that
shell (or the program it starts, or the dynamic loader under both) runs,
whatever the command says.  So when C{allowed_commands} is set, a spec may
not set any variable of L{RESTRICTED} unless C{[security]
allowed_environment} names it (or a prefix of it, C{NAME*}).

The list covers what the shell reads at start or while it runs (startup
files, options, the search path, word splitting, the trace prompt,
exported functions), what glibc's loader and C{iconv} read (preloads,
library paths, auditing, tunables, gconv modules), and the start-up hooks of
the common interpreters and of git.  It cannot cover every variable every
program reads: see docs/security.rst for what C{allowed_commands} can and
cannot promise.
"""

#: Names a spec may not set when allowed_commands is in force.
RESTRICTED_NAMES = frozenset({
    # the shell (sh, dash, bash, ksh, zsh)
    "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "PATH", "CDPATH", "FPATH",
    "GLOBIGNORE", "PROMPT_COMMAND", "BASH_XTRACEFD", "BASH_LOADABLES_PATH", "ZDOTDIR",
    "SHELL", "EXECIGNORE", "HOME",
    # glibc: loader, iconv, locales, tunables, resolver
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES",
    "RESOLV_HOST_CONF", "MALLOC_CHECK_", "MALLOC_TRACE",
    # interpreters and tools started by allowed commands
    "PERL5LIB", "PERL5OPT", "PERLLIB", "PERL5DB", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS",
    "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
    "LUA_INIT", "LUA_PATH", "LUA_CPATH", "TCLLIBPATH", "R_PROFILE", "R_PROFILE_USER",
    "R_ENVIRON", "R_ENVIRON_USER", "OPENSSL_CONF", "OPENSSL_ENGINES", "SSH_ASKPASS",
})
#: Prefixes: every name starting with one is restricted.
RESTRICTED_PREFIXES = ("LD_", "PYTHON", "BASH_FUNC_", "GIT_", "LUA_INIT_", "DYLD_")


def restricted(name):
    return name in RESTRICTED_NAMES or name.startswith(RESTRICTED_PREFIXES)


def _allowed(name, allowed):
    return any(name == a or (a.endswith("*") and name.startswith(a[:-1])) for a in allowed)


def refused_environment(environment, allowed=()):
    """
    The sorted names in C{environment} that a spec may not set, given the
    C{allowed_environment} names and prefixes.
    """
    return sorted(n for n in environment if restricted(n) and not _allowed(n, allowed))


def check(spec, allowed_commands, allowed_environment=()):
    """
    Refuse C{spec} (validated) if C{allowed_commands} is set and its command
    or environment is not allowed.

    @raise ValueError: with the task's failure reason.
    """
    if not allowed_commands:
        return
    if not any(p.fullmatch(spec["command"]) for p in allowed_commands):
        raise ValueError("command refused: it matches none of this agent's [security] allowed_commands")
    bad = refused_environment(spec.get("environment") or {}, allowed_environment)
    if bad:
        raise ValueError(
            "environment refused: with [security] allowed_commands set, a task may not set "
            + ", ".join(bad[:10]) + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
            + " (they change what the shell or the loader runs; [security] allowed_environment"
            " can allow them)"
        )
