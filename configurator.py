"""
Poor man's configurator, nanoGPT style, but a function instead of an exec'd snippet.

    python train.py config/geneval_k4.py --max_steps=10 --out_dir=out-k4

Arguments are applied left to right: a path ending in `.py` is executed as Python and every
top-level name it assigns (`name = value`, also inside if / for / with blocks) overrides that setting, except
private names (a leading `_`) and modules, functions and classes; names bound only by `import`, `def`, `class` or
as a loop variable are not settings, so a config file may use helpers; `--key=value` overrides
one setting, with the value parsed by `ast.literal_eval` (a bare word stays a string). Both are
checked against the defaults: an unknown key or a value whose type differs from the default's is a
ValueError / TypeError that names the key and where it came from. The one widening allowed is an
int where the default is a float (`--lr=1` means 1.0).

train.py calls `configure(defaults, sys.argv[1:])` and gets the effective config back as a dict.

Every command (train.py, evaluate.py, sample.py, perturb.py, data/shapes/pretrain.py, data/shapes/compare.py) runs
its checks inside `user_errors(name)`: a mistake in the settings or files it was given prints one line,
`name: error: message`, and exits with status 2 (as argparse does), without a Python traceback. Errors raised after
the checks (a bug, a crash mid-run) keep their traceback. E2PO_TRACEBACK=1 shows the traceback of a user error too.
"""

import ast
import contextlib
import os
import sys
import types

USER_ERRORS = (ValueError, TypeError, OSError)   # what the checks raise: bad values, wrong types, missing files


@contextlib.contextmanager
def user_errors(name):
    """Run a command's checks: a USER_ERRORS exception inside the block exits with its message and status 2."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("E2PO_TRACEBACK"):
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _check(key, value, defaults, origin):
    """Return `value` if `key` is known and `value` has the default's type; raise otherwise."""
    if key not in defaults:
        close = [k for k in defaults if k.split("_")[0] == key.split("_")[0]]
        hint = f" (did you mean one of {close}?)" if close else ""
        raise ValueError(f"unknown config key {key!r} in {origin}{hint}")
    default = defaults[key]
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is not type(default):
        raise TypeError(f"config key {key!r} in {origin}: expected {type(default).__name__} "
                        f"like the default {default!r}, got {type(value).__name__} {value!r}")
    return value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text  # a bare word such as --reward=pickscore stays a string


def assigned_names(tree):
    """Names a module binds by an assignment statement (=, +=, x: T = ..., :=) at its top level, inside if / for /
    while / with / try blocks too, but not inside a def, class or lambda: a config file's candidate settings. Names
    bound only by import, def, class, a for loop's target, `with ... as` or `except ... as` are not among them."""
    names = []

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
            targets = [node.target]
        for target in targets:
            names.extend(n.id for n in ast.walk(target) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return list(dict.fromkeys(names))


def apply_file(config, path):
    """Execute a config file and apply the names it assigns (checked against `config`). A setting is a name bound
    by an assignment (assigned_names) that does not start with "_" and whose value is not a module, function or
    class: `from math import pi`, `import os`, a helper `def`, a loop variable and `_tmp = ...` are not settings."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    scope = {}
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    exec(compile(tree, path, "exec"), scope)
    for key in assigned_names(tree):
        if key.startswith("_") or key not in scope:
            continue
        value = scope[key]
        if isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)):
            continue
        config[key] = _check(key, value, config, path)
    return config


def configure(defaults, argv):
    """Return a new dict: `defaults` overridden by the config files and --key=value pairs in argv."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ValueError(f"override {arg!r} must look like --key=value")
            key, text = arg[2:].split("=", 1)
            config[key] = _check(key, _parse_value(text), config, f"override {arg!r}")
        elif arg.endswith(".py"):
            apply_file(config, arg)
        else:
            raise ValueError(f"argument {arg!r} is neither a config file (*.py) nor --key=value")
    return config
