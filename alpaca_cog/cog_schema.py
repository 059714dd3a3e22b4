"""Write .cog/openapi_schema.json the way `cog build` does, from Cog's own Python inspector.

Cog's HTTP server (coglet) validates inputs and serves /openapi.json only from that file,
which the Go CLI writes during `cog build`. Without Docker and the CLI we generate it here
from `cog._inspector`, so a locally served model validates exactly as on Replicate.

    python -m alpaca_cog.cog_schema [--config cog.yaml] [--out .cog/openapi_schema.json]
"""

import argparse
import ast
import json
import sys
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

import yaml

from cog import _adt as adt
from cog._inspector import create_predictor

SCHEMA_PATH = Path(".cog/openapi_schema.json")


def _default(field: adt.InputField) -> Any:
    d = field.default
    if isinstance(d, Field):
        if d.default_factory is not MISSING:
            return d.default_factory()
        return None if d.default is MISSING else d.default
    return d


def input_schema(info: adt.PredictorInfo, title: str) -> tuple[dict, dict]:
    """The input object schema, and one enum schema per input with choices."""
    props, required, enums = {}, [], {}
    for name, f in info.inputs.items():
        prop: dict[str, Any] = {"x-order": f.order}
        if f.choices is not None:
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
            enums[name] = {"title": name, "description": "An enumeration.", "enum": f.choices}
            enums[name].update(f.type.primitive.json_type())
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(f.type.json_type())
        default = _default(f)
        if default is None:
            if f.type.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED):
                required.append(name)
        else:
            prop["default"] = f.type.json_encode(f.type.normalize(default))
        if f.type.repetition is adt.Repetition.OPTIONAL:
            prop["nullable"] = True
        for key, value in [
            ("description", f.description), ("minimum", f.ge), ("maximum", f.le),
            ("minLength", f.min_length), ("maxLength", f.max_length),
            ("pattern", f.regex), ("deprecated", f.deprecated),
        ]:  # fmt: skip
            if value is not None:
                prop[key] = value
        props[name] = prop
    schema = {"title": title, "type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema, enums


def _json(ref: str | None = None) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"} if ref else {}}}}


_OK = {"description": "Successful Response", **_json()}
_INVALID = {"description": "Validation Error", **_json("HTTPValidationError")}


def _run_decorators(ref: str) -> list[ast.expr]:
    """The decorators of the run()/predict() (or function) named by ref, read from the source as Cog's build does."""
    file, name = ref.split(":")
    tree = ast.parse(Path(file).read_text())
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if getattr(node, "name", None) != name:
            continue
        fns = [node] if isinstance(node, functions) else [
            f for f in getattr(node, "body", []) if isinstance(f, functions) and f.name in ("run", "predict")
        ]  # fmt: skip
        return [d for fn in fns for d in fn.decorator_list]
    return []


def _named(decorator: ast.expr, name: str) -> bool:
    d = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(d, ast.Name) and d.id == name) or (isinstance(d, ast.Attribute) and d.attr == name)


def is_streaming(ref: str) -> bool:
    """Whether run() carries @streaming / @cog.streaming (it does nothing at run time; Cog's build reads it)."""
    return any(_named(d, "streaming") for d in _run_decorators(ref))


def max_concurrency(ref: str) -> int:
    """@cog.concurrent(max=N)'s literal N, which `cog build` bakes into the image as COG_MAX_CONCURRENCY; else 1."""
    for d in _run_decorators(ref):
        if _named(d, "concurrent") and isinstance(d, ast.Call):
            for keyword in d.keywords:
                if keyword.arg == "max" and isinstance(keyword.value, ast.Constant):
                    return keyword.value.value
    return 1


def _endpoint(info: adt.PredictorInfo, train: bool, streaming: bool) -> tuple[dict, dict]:
    """Paths and component schemas of /predictions (Input, Output) or /trainings (TrainingInput, TrainingOutput)."""
    noun, verb, prefix = ("training", "Training", "Training") if train else ("prediction", "Prediction", "")
    inputs, enums = input_schema(info, f"{prefix}Input")
    output = {**info.output.json_type(), "title": f"{prefix}Output"}
    paths = {
        f"/{noun}s": {
            "post": {
                "summary": "Train" if train else "Predict",
                "description": "Run a training session" if train else "Run a single prediction on the model",
                "operationId": f"{'train' if train else 'predict'}_{noun}s_post",
                "requestBody": _json(f"{verb}Request"),
                "responses": {"200": {"description": "Successful Response", **_json(f"{verb}Response")}, "422": _INVALID},
                **({"x-cog-streaming": True} if streaming else {}),
            }
        },
        f"/{noun}s/{{{noun}_id}}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": f"cancel_{noun}s__{noun}_id__cancel_post",
                "parameters": [
                    {"required": True, "schema": {"title": f"{verb} Id", "type": "string"}, "name": f"{noun}_id", "in": "path"}
                ],
                "responses": {"200": _OK, "422": _INVALID},
            }
        },
    }
    date = {"type": "string", "format": "date-time"}
    schemas = {
        f"{prefix}Input": inputs,
        f"{prefix}Output": output,
        **enums,
        f"{verb}Request": {
            "title": f"{verb}Request",
            "type": "object",
            "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": f"#/components/schemas/{prefix}Input"}},
        },
        f"{verb}Response": {
            "title": f"{verb}Response",
            "type": "object",
            "properties": {
                "input": {"$ref": f"#/components/schemas/{prefix}Input"},
                "output": {"$ref": f"#/components/schemas/{prefix}Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **date},
                "started_at": {"title": "Started At", **date},
                "completed_at": {"title": "Completed At", **date},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
    }
    return paths, schemas


def openapi_schema(run_ref: str, train_ref: str | None = None) -> dict:
    """One document for the model, as `cog build` writes it: /predictions, and /trainings if there is a trainer.

    Refs are Cog's `file.py:Name`, relative to the current folder (the project root)."""
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _OK}}},
        "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": {"200": _OK}}},
    }
    schemas = {
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    for ref, train in [(run_ref, False), (train_ref, True)]:
        if ref:
            p, s = _endpoint(inspect_ref(ref), train, is_streaming(ref))
            paths.update(p)
            schemas.update(s)
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"}, "paths": paths, "components": {"schemas": schemas}}


def inspect_ref(ref: str) -> adt.PredictorInfo:
    file, name = ref.split(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    return create_predictor(Path(file).stem, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("cog.yaml"), help="names run: and train:")
    parser.add_argument("--out", type=Path, default=SCHEMA_PATH)
    parser.add_argument("--concurrency", action="store_true", help="print run()'s @cog.concurrent max and exit")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    run, train = config.get("run") or config["predict"], config.get("train")
    if args.concurrency:
        print(max_concurrency(run))
        return
    schema = openapi_schema(run, train)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(schema, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
