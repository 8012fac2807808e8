"""Regenerate `trainjob.v1alpha1.schema.json` from Kubeflow Trainer's published TrainJob CRD.

    python tests/schemas/make_trainjob_schema.py trainer.kubeflow.org_trainjobs.yaml

Source: github.com/kubeflow/trainer (Apache-2.0), manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml
at commit 8c0f5059bd51ec3ba6d6a6a7b2e1471de7bc13b3 (2026-08-21).
Kept: the `v1alpha1` openAPIV3Schema. Changed: descriptions dropped (size), and every object that lists
its `properties` without `additionalProperties` refuses unknown keys, as the API server's strict field
validation does (`kubectl apply --validate=strict`). CEL rules (`x-kubernetes-validations`) are not
checked by jsonschema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def strict(node):
    if isinstance(node, dict):
        out = {k: strict(v) for k, v in node.items() if k != "description"}
        closed = out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
        if closed and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def main(crd_path: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = "TrainJob trainer.kubeflow.org/v1alpha1 (from the Kubeflow Trainer CRD)"
    out = Path(__file__).with_name("trainjob.v1alpha1.schema.json")
    out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
