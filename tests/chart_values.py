"""Value sets and readers shared by the chart tests (tests/test_chart.py, tests/test_chart_mlflow.py).

Every toggle of charts/tgrl has a value set here, rendered alone and inside `everything`; the tests
lint, render and validate each variant. ServiceMonitor is a Prometheus Operator CRD that
kubernetes-validate has no schema for: it is validated against tests/schemas/servicemonitor-v1.json,
a strict subset of the CRD's openAPIV3Schema (monitoring.coreos.com/v1) covering the fields the chart
writes; every other object goes through kubernetes-validate.
"""

from __future__ import annotations

import json
from pathlib import Path

from infra_tools import KUBERNETES_VERSION, by_kind, containers, find_venv_tool, render, run

NAMESPACE = "ml"
RELEASE = "tgrl"
MLFLOW_SVC = "tgrl-mlflow"  # <release>-mlflow: the release name contains the chart name
MLFLOW_URL = f"http://{MLFLOW_SVC}.{NAMESPACE}.svc.cluster.local:5000"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD_SCHEMAS = {"ServiceMonitor": SCHEMAS / "servicemonitor-v1.json"}

BASIC_AUTH = {"mlflow.basicAuth.enabled": "true"}
INGRESS = {
    "mlflow.ingress.enabled": "true",
    "mlflow.ingress.className": "nginx",
    "mlflow.ingress.annotations.cert-manager\\.io/cluster-issuer": "letsencrypt",
    "mlflow.ingress.hosts[0].host": "mlflow.ml.example.org",
    "mlflow.ingress.hosts[0].paths[0].path": "/",
    "mlflow.ingress.hosts[0].paths[0].pathType": "Prefix",
    "mlflow.ingress.tls[0].secretName": "mlflow-tls",
    "mlflow.ingress.tls[0].hosts[0]": "mlflow.ml.example.org",
}
METRICS = {"mlflow.metrics.enabled": "true"}
SERVICE_MONITOR = {
    "mlflow.metrics.serviceMonitor.enabled": "true",
    "mlflow.metrics.serviceMonitor.labels.release": "kube-prometheus-stack",
    "mlflow.metrics.serviceMonitor.interval": "15s",
}
EXTRAS = {
    "mlflow.extraArgs[0]": "--gunicorn-opts",
    "mlflow.extraArgs[1]": "--timeout 120",
    "mlflow.extraEnv[0].name": "PGSSLROOTCERT",
    "mlflow.extraEnv[0].value": "/etc/db-ca/ca.crt",
    "mlflow.extraEnv[1].name": "PGSSLPASSWORD",
    "mlflow.extraEnv[1].valueFrom.secretKeyRef.name": "db-ca",
    "mlflow.extraEnv[1].valueFrom.secretKeyRef.key": "passphrase",
    "mlflow.extraVolumes[0].name": "db-ca",
    "mlflow.extraVolumes[0].configMap.name": "db-ca",
    "mlflow.extraVolumeMounts[0].name": "db-ca",
    "mlflow.extraVolumeMounts[0].mountPath": "/etc/db-ca",
    "mlflow.extraVolumeMounts[0].readOnly": "true",
    "mlflow.probes.liveness.periodSeconds": "30",
    "mlflow.probes.readiness.failureThreshold": "6",
    "mlflow.migrations.serviceAccountName": "mlflow-migrations",
}
NO_MIGRATIONS = {"mlflow.migrations.enabled": "false"}
EVERYTHING = {
    **BASIC_AUTH,
    **INGRESS,
    **SERVICE_MONITOR,
    **EXTRAS,
    "mlflow.basicAuth.database.existingSecret": "mlflow-auth-db",
    "mlflow.allowedHosts[0]": "mlflow.example.com",
    "mlflow.corsAllowedOrigins[0]": "https://notebooks.example.com",
    "mlflow.image.digest": "sha256:" + "a" * 64,
    "schedule.kfp.namespace": "team-a",
    "schedule.kfp.serviceAccountToken.enabled": "true",
    "schedule.componentImages.cpu": "registry.example/tgrl@sha256:" + "b" * 64,
    "schedule.params.base_model": "s3://models/qwen2.5-vl-3b",
    "schedule.runServiceAccount": "pipeline-runner",
    "schedule.profile": "gpu",
}
VARIANTS = {
    "default": {},
    "basic-auth": BASIC_AUTH,
    "ingress": INGRESS,
    "metrics": METRICS,
    "service-monitor": SERVICE_MONITOR,
    "extras": EXTRAS,
    "no-migrations": NO_MIGRATIONS,
    "everything": EVERYTHING,
}
BASE_KINDS = {"ServiceAccount", "ConfigMap", "Service", "Deployment", "Job"}
EXTRA_KINDS = {"ingress": {"Ingress"}, "service-monitor": {"ServiceMonitor"}}
EXTRA_KINDS["everything"] = EXTRA_KINDS["ingress"] | EXTRA_KINDS["service-monitor"]


def render_chart(helm, sets: dict[str, str]) -> tuple[str, list[dict]]:
    return render(helm, sets, release=RELEASE, namespace=NAMESPACE)


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def job(objects: list[dict], component: str) -> dict:
    """The Job labelled app.kubernetes.io/component=`component` (schedule, mlflow-db-upgrade)."""
    found = [
        j
        for j in by_kind(objects, "Job")
        if j["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"expected one {component} Job, got {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container_named(objects: list[dict], kind: str, name: str) -> dict:
    return next(c for c in containers(pod_spec(one(objects, kind))) if c["name"] == name)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def validate(text: str, objects: list[dict], tmp_path: Path) -> None:
    """Strict kubernetes-validate of every built-in object; CRD objects against tests/schemas/."""
    import jsonschema
    import yaml

    builtin = [o for o in objects if o["kind"] not in CRD_SCHEMAS]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    validator = find_venv_tool("kubernetes-validate")
    assert validator is not None, "kubernetes-validate not found: it comes with the dev extras"
    result = run([validator, "--kubernetes-version", KUBERNETES_VERSION, "--strict", "--no-warn", manifest])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(builtin), result.stdout
    for obj in objects:
        if obj["kind"] in CRD_SCHEMAS:
            schema = json.loads(CRD_SCHEMAS[obj["kind"]].read_text())
            jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)
