"""
The Everest dialect of the task spec (contract, section 8), in one place.

Production Everest and its clients name a task's files differently from the
native spec of sections 3-4: ``inputData`` and ``outputData`` instead of
``inputs`` and ``outputs``, an ``auth`` header per input, outputs that may
stay in the task directory, and environment values with ``$VAR`` and
``@PATH_SEP``.  This module turns such a spec into a native one (so the
worker, the stager and the handlers see only one kind of task) plus a small
C{everest} record of what the native spec cannot say, and builds the
C{STAGED_OUT} report that answers it.  Nothing here does I/O.
"""

import re
from urllib.parse import quote

from everest_agent.protocol import SpecError, _relative_path, validate_spec

#: The key of a native spec under which a translated task keeps what only
#: its dialect knows (its name, input headers, kept outputs).
EVEREST = "everest"

#: Longest ``auth`` value (an ``Authorization`` header) accepted.
MAX_AUTH = 8192
#: Longest task ``name`` kept.
MAX_NAME = 256

_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_URL = re.compile(r"https?://", re.IGNORECASE)


def is_everest(spec, passive=False):
    """
    Whether C{spec} is in the Everest dialect: it names C{inputData} or
    C{outputData}, or it came over a passive-mode session.
    """
    return passive or (isinstance(spec, dict) and ("inputData" in spec or "outputData" in spec))


def expand(value, environ):
    """
    One environment value of the dialect: C{$NAME} and C{${NAME}} become that
    variable of C{environ} (empty when unset), C{@PATH_SEP} becomes C{:}.
    """
    value = _VARIABLE.sub(lambda m: environ.get(m.group(1) or m.group(2), ""), value)
    return value.replace("@PATH_SEP", ":")


def _url(value, what):
    if not isinstance(value, str) or not _URL.match(value):
        raise SpecError(f"{what}: 'uri' must be an http:// or https:// URL")
    if any(c in value for c in "\r\n\0 "):
        raise SpecError(f"{what}: 'uri' contains white space or a control character")
    return value


def _list(spec, key, limit=10000):
    items = spec.get(key)
    if items is None:
        return []
    if not isinstance(items, list) or len(items) > limit:
        raise SpecError(f"'{key}' must be a list of at most {limit} objects")
    return items


def _input(item, what):
    if not isinstance(item, dict):
        raise SpecError(f"{what} must be an object")
    unknown = set(item) - {"path", "uri", "auth"}
    if unknown:
        raise SpecError(f"{what}: unknown field {sorted(unknown)[0]!r} (known: auth, path, uri)")
    path = _relative_path(item.get("path"), what)
    uri = _url(item.get("uri"), what)
    auth = item.get("auth")
    if auth is not None:
        if not isinstance(auth, str) or not auth or len(auth) > MAX_AUTH:
            raise SpecError(f"{what}: 'auth' must be a non-empty string of at most {MAX_AUTH} characters")
        if any(c in auth for c in "\r\n\0"):
            raise SpecError(f"{what}: 'auth' contains a line break or a NUL byte")
    return path, uri, auth


def _output(item, what):
    if not isinstance(item, dict):
        raise SpecError(f"{what} must be an object")
    unknown = set(item) - {"paths", "uri"}
    if unknown:
        raise SpecError(f"{what}: unknown field {sorted(unknown)[0]!r} (known: paths, uri)")
    paths = item.get("paths")
    if not isinstance(paths, list) or not paths:
        raise SpecError(f"{what}: 'paths' must be a non-empty list of file names or globs")
    clean = [_relative_path(p, f"{what}.paths[{j}]") for j, p in enumerate(paths)]
    uri = item.get("uri")
    return clean, (None if uri is None else _url(uri, what))


def to_native(spec, environ, context=None):
    """
    Translate an Everest-dialect spec into a native one.

    The result still goes through L{everest_agent.protocol.validate_spec}
    like every spec; it holds, under L{EVEREST}, what only the dialect says:
    the task's C{name}, the C{auth} header of each input by path, the globs
    of outputs that stay in the task directory (C{keep}), and the
    C{context} that came after the spec (kept, never interpreted).

    @param environ: the agent's own environment, for C{$NAME} in values.
    @raise SpecError: naming the field that is wrong.
    """
    if not isinstance(spec, dict):
        raise SpecError("the spec must be an object")
    if "inputs" in spec or "outputs" in spec:
        raise SpecError("a spec in the Everest dialect uses 'inputData'/'outputData', not 'inputs'/'outputs'")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        raise SpecError(f"'name' must be a string of at most {MAX_NAME} characters")
    if context is not None and not isinstance(context, dict):
        raise SpecError("the context after the spec must be an object")

    inputs, auth = [], {}
    for i, item in enumerate(_list(spec, "inputData")):
        path, uri, header = _input(item, f"inputData[{i}]")
        inputs.append({"path": path, "uri": uri})
        if header is not None:
            auth[path] = header

    outputs, keep = [], []
    for i, item in enumerate(_list(spec, "outputData")):
        paths, uri = _output(item, f"outputData[{i}]")
        if uri is None:
            keep.extend(paths)
        else:
            outputs.extend({"pattern": p, "uri": uri} for p in paths)

    environment = spec.get("environment") or {}
    if not isinstance(environment, dict):
        raise SpecError("'environment' must be an object of strings")
    expanded = {}
    for key, value in environment.items():
        if not isinstance(value, str):
            raise SpecError(f"environment variable {str(key)[:64]!r} must have a string value")
        expanded[key] = expand(value, environ)

    native = {key: value for key, value in spec.items() if key not in ("inputData", "outputData", "name")}
    native.update(environment=expanded, inputs=inputs, outputs=outputs)
    native[EVEREST] = {"name": name, "auth": auth, "keep": keep, "context": context}
    return native


def extras(spec):
    """The dialect's record of a (translated, validated) spec, or C{None} for a native one."""
    record = spec.get(EVEREST) if isinstance(spec, dict) else None
    return record if isinstance(record, dict) else None


def input_authorization(spec, path):
    """
    The C{Authorization} header an input of this task is fetched with, or
    C{None} when the agent decides (its own token, to the platform only).
    """
    record = extras(spec)
    return None if record is None else record["auth"].get(path)


def staging_inputs(spec):
    """
    The inputs of a (translated, validated) spec as the stager takes them:
    an input whose dialect gave an C{auth} carries it as C{authorization}
    (sent verbatim, instead of anything the agent would send).  A native
    spec's inputs come back as they are.
    """
    record = extras(spec)
    auth = record.get("auth") if record is not None else None
    if not auth:
        return spec["inputs"]
    return [dict(item, authorization=auth[item["path"]]) if item["path"] in auth else item
            for item in spec["inputs"]]


def check_extras(spec):
    """
    Check the L{EVEREST} record of a spec read back from the agent's state
    directory (it was written by L{to_native}; this catches a damaged one).

    @raise SpecError: naming what is wrong.
    """
    if not isinstance(spec, dict) or EVEREST not in spec:
        return
    record = spec[EVEREST]
    if not isinstance(record, dict):
        raise SpecError(f"'{EVEREST}' must be an object")
    auth = record.get("auth")
    if not isinstance(auth, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in auth.items()):
        raise SpecError(f"'{EVEREST}.auth' must map input paths to headers")
    keep = record.get("keep")
    if not isinstance(keep, list) or not all(isinstance(p, str) for p in keep):
        raise SpecError(f"'{EVEREST}.keep' must be a list of file names or globs")
    if record.get("name") is not None and not isinstance(record["name"], str):
        raise SpecError(f"'{EVEREST}.name' must be a string")
    if record.get("context") is not None and not isinstance(record["context"], dict):
        raise SpecError(f"'{EVEREST}.context' must be an object")


def kept_uri(task_id, path):
    """Where passive mode serves a kept output: C{/files/<taskId>/<quoted path>}."""
    return f"/files/{task_id}/{quote(path)}"


#: The C{outputData} of one C{STAGED_OUT} is kept under this many bytes of
#: JSON (about), so that the report fits in one frame (1 MiB) with room to spare.
MAX_OUTPUT_DATA_JSON = 512 * 1024
#: What one entry costs besides its path and uri (a hash, a size, the keys).
_ENTRY_COST = 120


def staged_out(files, limit=MAX_OUTPUT_DATA_JSON):
    """
    The C{info} of the C{STAGED_OUT} report of an Everest-dialect task.

    @param files: one mapping per output file, with C{path}, C{size},
        C{sha256} and, where it can be fetched from or was PUT to, C{uri}.
    @param limit: about how many bytes of JSON the list may take; the
        entries past it are left out and counted in C{outputDataOmitted}.
    """
    entries, total = [], 0
    for f in files:
        entry = {"path": f["path"], "size": f["size"], "sha256": f["sha256"]}
        if f.get("uri"):
            entry["uri"] = f["uri"]
        total += len(entry["path"]) + len(entry.get("uri", "")) + _ENTRY_COST
        if total > limit:
            break
        entries.append(entry)
    info = {"outputData": entries}
    if len(entries) < len(files):
        info["outputDataOmitted"] = len(files) - len(entries)
    return info


def validate(spec, environ, context=None, passive=False):
    """
    Check a spec of either dialect as it arrives in C{TASK_SUBMIT}, and
    return the normalised native spec the rest of the agent runs.

    A native spec may not carry the L{EVEREST} key itself: only a
    translation writes it.

    @raise SpecError: with a reason fit for a C{FAILED} task.
    """
    if is_everest(spec, passive):
        return validate_spec(to_native(spec, environ, context))
    if isinstance(spec, dict) and EVEREST in spec:
        raise SpecError(f"'{EVEREST}' is a reserved field of the spec")
    clean = validate_spec(spec)
    if context is not None:
        if not isinstance(context, dict):
            raise SpecError("the context after the spec must be an object")
        clean["context"] = context
    return clean
