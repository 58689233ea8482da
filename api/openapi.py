"""The OpenAPI 3.1 document, generated from the route table and the pydantic models."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, TypeAdapter

from .models import ErrorBody

REF = "#/components/schemas/{model}"


def _schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(tp).json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        components[tp.__name__] = schema
        return {"$ref": REF.format(model=tp.__name__)}
    return schema


def document(routes: list[Any]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    error_ref = _schema(ErrorBody, components)
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler.__name__}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"{(\w+)}", r.path)]
        params += [{"name": n, "in": "query", "required": False, "schema": {"type": t}} for n, t in r.query]
        if params:
            op["parameters"] = params
        if r.access != "api":  # public, or the step's own credential checked by the handler
            op["security"] = []
        if isinstance(r.body, str):
            op["requestBody"] = {"content": {r.body: {"schema": {}}}}
        elif r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _schema(r.body, components)}}}
        ok: dict[str, Any] = {"description": "OK"}
        if r.response is not None:
            ok["content"] = {"application/json": {"schema": _schema(r.response, components)}}
        op["responses"] = {"200": ok, **{str(code): {"description": "error", "content": {
            "application/json": {"schema": error_ref}}} for code in r.errors}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Mlynar Events", "version": "1"},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
