"""Stage keys: a stage's key is a hash of its upstream stage's key, its name, its settings, its models' identity
and the version of the code that computes it. Chained this way, no stage can forget an upstream setting: anything
that changes a stage's input changes the key of every stage after it.

The code version hashes only code that changes outputs: the stage's own module and the modules every stage runs
on (engines, models, templates, the offline test models). Python is hashed as its syntax tree without
docstrings, so a comment or a docstring never throws away finished work; the card, the CLI and the publishing code
are not part of it at all.
"""

import ast
import hashlib
import inspect
import json
from functools import cache
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1]
# Code that changes what every model stage computes, relative to the package.
SHARED_CODE = ("engines", "models.py", "templates.py", "testing")
CODE_SUFFIXES = (".py", ".c", ".json", ".jinja")


def digest(*parts) -> str:
    """A short stable hash of JSON-able parts (dataclasses and other objects by their repr)."""
    payload = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def file_version(path: str) -> str:
    """The hash of what a source file computes: Python by its syntax tree without docstrings, other files by bytes."""
    data = Path(path).read_bytes()
    if path.endswith(".py"):
        data = ast.dump(_strip_docstrings(ast.parse(data)), include_attributes=False).encode()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _files(relative: str) -> list[Path]:
    path = PACKAGE / relative
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts)


@cache
def shared_code_version() -> str:
    return digest(
        [
            (str(p.relative_to(PACKAGE)), file_version(str(p)))
            for p in (f for relative in SHARED_CODE for f in _files(relative))
        ]
    )


def code_files(*functions) -> list[Path]:
    """The source files that define `functions` (a stage's own module)."""
    functions = [getattr(f, "func", f) for f in functions if f is not None]  # a partial is its function
    return sorted({Path(inspect.getsourcefile(f)).resolve() for f in functions})


def code_version(*functions) -> str:
    """The version of the code behind a stage: the modules that define `functions`, and the shared code."""
    return digest(shared_code_version(), [(f.name, file_version(str(f))) for f in code_files(*functions)])


def model_identity(spec) -> tuple:
    """What of a model spec changes its output (not where it runs)."""
    return spec.name_or_path, spec.revision, spec.trust_remote_code, spec.dtype, spec.engine


def stage_key(upstream: str, stage) -> str:
    """`<name>-<hash>` of the upstream key, the stage's name, settings, models and code version."""
    models = {role: model_identity(spec) for role, spec in sorted(stage.models.items())}
    version = code_version(stage.apply, stage.start, stage.tally)
    return f"{stage.name}-{digest(upstream, stage.name, stage.settings, models, version)}"
