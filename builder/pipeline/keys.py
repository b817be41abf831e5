"""Stage keys: a stage's key is a hash of its upstream stage's key, its name, its settings, its models' identity
and the version of the code that computes it. Chained this way, no stage can forget an upstream setting: anything
that changes a stage's input changes the key of every stage after it.

The code version hashes only code that changes outputs: the stage's own module and every builder module it
imports, directly or not (seeds, templates, models, engines), the data files the engines and test models read, and
the versions of the libraries that compute (torch, transformers, tokenizers, vLLM). Python is hashed as its syntax
tree without docstrings, so a comment or a docstring never throws away finished work; the card, the CLI and the
publishing code are imported by no stage, so they are not part of it at all.
"""

import ast
import dataclasses
import hashlib
import inspect
import json
from functools import cache
from importlib import metadata
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1]
# Files besides Python that change what stages compute (the C kernel, the test models' chat templates).
SHARED_DATA = ("engines", "testing")
DATA_SUFFIXES = (".c", ".json", ".jinja")
LIBRARIES = ("torch", "transformers", "tokenizers", "vllm")


def _canonical(value):
    """A JSON-able form that is the same in every process: dataclasses by class and fields, sets sorted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__class__": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(
        f"Cannot key a {type(value).__name__} ({value!r}): a stage's settings must hold plain values (numbers, "
        "strings, tuples, frozen dataclasses of them)."
    )


def digest(*parts) -> str:
    """A short stable hash of plain values and dataclasses of them."""
    payload = json.dumps(_canonical(parts), sort_keys=True)
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
    """The hash of what a source file computes: Python by its code without docstrings or comments (as
    `ast.unparse` writes it), other files by bytes."""
    data = Path(path).read_bytes()
    if path.endswith(".py"):
        data = ast.unparse(_strip_docstrings(ast.parse(data))).encode()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _module_file(module: str) -> Path | None:
    """The file of a `builder.` module (a package's `__init__.py`), or None."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    path = PACKAGE.joinpath(*parts[1:])
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _package_of(path: Path) -> str:
    """The dotted package a file's relative imports start from ("" outside the builder)."""
    if not path.is_relative_to(PACKAGE):
        return ""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def _imports(path: Path) -> set[Path]:
    """The builder modules a file imports, at module level or inside functions (lazy imports count too)."""
    package = _package_of(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if not package:
                    continue
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # `from . import module` too
        for name in names:
            parts = name.split(".")
            for end in range(2, len(parts) + 1):  # a module's packages run their __init__ too
                file = _module_file(".".join(parts[:end]))
                if file is not None:
                    found.add(file.resolve())
    return found


@cache
def import_closure(path: Path) -> tuple[Path, ...]:
    """`path` and every builder module it imports, directly or not."""
    seen, todo = set(), [path.resolve()]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(_imports(current) - seen)
    return tuple(sorted(seen))


@cache
def shared_version() -> str:
    """The data files the engines and test models read, and the versions of the libraries that compute."""
    data = sorted(p for relative in SHARED_DATA for p in (PACKAGE / relative).rglob("*") if p.suffix in DATA_SUFFIXES)
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            versions[library] = None
    return digest([(p.relative_to(PACKAGE).as_posix(), file_version(str(p))) for p in data], versions)


def code_files(*functions) -> list[Path]:
    """The source files behind `functions`: the modules that define them and every builder module those import."""
    files = set()
    for function in functions:
        if function is None:
            continue
        function = getattr(function, "func", function)  # a partial is its function
        try:
            source = Path(inspect.getsourcefile(function))
        except TypeError:
            source = None
        if source is None or not source.is_file():
            raise TypeError(
                f"{function!r} is not defined in a module file, so its code cannot be part of a stage's key: "
                "define a stage's functions in a module (a .py file), not in a notebook, a REPL or an object."
            )
        files.update(import_closure(source.resolve()))
    return sorted(files)


def code_version(*functions) -> str:
    """The version of the code behind a stage: its modules, what they import, and the shared data and libraries."""
    files = code_files(*functions)
    return digest(shared_version(), [(_display(f), file_version(str(f))) for f in files])


def _display(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else path.name


def model_identity(spec) -> tuple:
    """What of a model spec changes its output (not where it runs)."""
    return spec.name_or_path, spec.revision, spec.trust_remote_code, spec.dtype, spec.engine


def stage_key(upstream: str, stage) -> str:
    """`<name>-<hash>` of the upstream key, the stage's name, settings, models and code version."""
    models = {role: model_identity(spec) for role, spec in sorted(stage.models.items())}
    try:
        version = code_version(stage.apply, stage.start, stage.tally)
        return f"{stage.name}-{digest(upstream, stage.name, stage.settings, models, version)}"
    except TypeError as error:
        from .stage import StageError

        raise StageError(f"Stage {stage.name}: {error}") from None
