"""A small kustomize renderer for the features k8s/ uses, so the tests need no kubectl.

Supports: resources (files and directories), namespace, labels (metadata only), images,
configMapGenerator (files, options.labels), and patches by path with a target (kind, name regex,
labelSelector) applied as strategic merges (lists of named items merge by name; null deletes).
tests/ops/test_k8s.py compares its output with `kubectl kustomize` where kubectl exists.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
}


def load_docs(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of `path`, each a fresh tree (no objects shared through aliases)."""
    return [copy.deepcopy(d) for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "kustomization.yaml").read_text())


def _merge_key(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    return item.get("name") or (item.get("metadata") or {}).get("name")


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge, as far as these manifests need it."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and patch
        and all(_merge_key(i) for i in base + patch)
    ):
        out = [copy.deepcopy(i) for i in base]
        for item in patch:
            for n, existing in enumerate(out):
                if _merge_key(existing) == _merge_key(item):
                    out[n] = merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    meta = doc.get("metadata", {})
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], meta.get("name", "")):
        return False
    if "labelSelector" in target:
        labels = meta.get("labels") or {}
        for term in target["labelSelector"].split(","):
            key, _, value = term.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def build(root: Path) -> list[dict[str, Any]]:
    """Render the kustomization at `root` (a directory)."""
    k = kustomization(root)
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = root / res
        docs += build(path) if path.is_dir() else load_docs(path)
    for gen in k.get("configMapGenerator", []):
        opts = gen.get("options", {})
        meta: dict[str, Any] = {"name": gen["name"]}
        if opts.get("labels"):
            meta["labels"] = dict(opts["labels"])
        data = {Path(f).name: (root / f).read_text() for f in gen.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for p in k.get("patches", []):
        patch = yaml.safe_load((root / p["path"]).read_text())
        target = p.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        body = {key: v for key, v in patch.items() if key not in ("apiVersion", "kind", "metadata")}
        for n, doc in enumerate(docs):
            if _matches(doc, target):
                docs[n] = merge(doc, body)
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for image in k.get("images", []):
        for doc in docs:
            for c in _containers(doc):
                name, _, _tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs
