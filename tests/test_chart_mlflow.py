"""The chart's MLflow deployment toggles, offline and against a real PostgreSQL: the `mlflow db upgrade`
hook Job (its rendered command migrates a real empty database, twice), Ingress, Prometheus metrics and
the ServiceMonitor, extraArgs / extraEnv / extraVolumes, probe timings, the values schema of each, the
NOTES' copy-paste `kubectl create secret` lines for the pipeline's Secrets (checked against the names
compiled into the pipeline) and the chart README's values table (checked against values.yaml).

Every variant is also linted, rendered and validated by tests/test_chart.py (value sets in
tests/chart_values.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chart_values import (
    MLFLOW_SVC,
    MLFLOW_URL,
    NAMESPACE,
    RELEASE,
    SCHEMAS,
    VARIANTS,
    container_named,
    env_of,
    job,
    one,
    pod_spec,
    render_chart,
)
from infra_tools import CHART_DIR, by_kind, cli_args, flag_value, helm_template, run
from tgrl_lib.kfp_pipelines.placement import MLFLOW_KEYS, MLFLOW_SECRET, S3_KEYS, S3_SECRET


@pytest.fixture(scope="module")
def rendered(helm):
    return {name: render_chart(helm, sets) for name, sets in VARIANTS.items()}


def _hosts(objects: list[dict]) -> list[str]:
    return flag_value(cli_args(container_named(objects, "Deployment", "mlflow")), "--allowed-hosts").split(
        ","
    )


def _upgrade_container(objects: list[dict]) -> dict:
    return pod_spec(job(objects, "mlflow-db-upgrade"))["containers"][0]


# ------------------------------------------------------------------------------ migration Job
def test_db_upgrade_job_is_a_hook_before_the_server_and_reads_only_the_db_secret(rendered):
    _, objects = rendered["default"]
    upgrade = job(objects, "mlflow-db-upgrade")
    annotations = upgrade["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert int(annotations["helm.sh/hook-weight"]) < 0
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    spec = pod_spec(upgrade)
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    # pre-install runs before the chart's ServiceAccount exists: the Job must not name it
    assert "serviceAccountName" not in spec
    container = _upgrade_container(objects)
    assert cli_args(container) == ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]
    ref = env_of(container)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "tgrl-mlflow-db", "key": "uri"}
    assert container["image"] == container_named(objects, "Deployment", "mlflow")["image"]

    _, extras = rendered["extras"]
    assert pod_spec(job(extras, "mlflow-db-upgrade"))["serviceAccountName"] == "mlflow-migrations"
    _, off = rendered["no-migrations"]
    assert [j["metadata"]["labels"]["app.kubernetes.io/component"] for j in by_kind(off, "Job")] == [
        "schedule"
    ]


def _run_container(container: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a rendered container's command here, expanding `$(VAR)` from `env` as the kubelet does."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in cli_args(container)]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        argv,
        env={**os.environ, **env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.timeout(600)
def test_db_upgrade_job_command_migrates_a_real_postgres_database(rendered, postgres_server):
    """The rendered command on an empty PostgreSQL database creates MLflow's schema, and a second run (the
    next `helm upgrade`) leaves it at the same version."""
    container = _upgrade_container(rendered["default"][1])
    database = postgres_server.create_database("hook")
    try:
        uri, seen = postgres_server.uri(database), []
        for attempt in ("install", "upgrade"):
            done = _run_container(container, {"MLFLOW_BACKEND_STORE_URI": uri})
            assert done.returncode == 0, f"{attempt}: {done.stdout}\n{done.stderr}"
            with postgres_server.connect(database) as conn:
                versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
                tables = {
                    r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                }
            assert len(versions) == 1, attempt
            assert {
                "experiments",
                "runs",
                "registered_models",
                "model_versions",
                "registered_model_aliases",
            } <= tables
            seen.append(versions)
        assert seen[0] == seen[1]
        assert postgres_server.password not in done.stdout + done.stderr  # the URI is not logged
    finally:
        postgres_server.drop_database(database)


# ------------------------------------------------------------------------------------ Ingress
def test_ingress_routes_its_hosts_to_the_service_and_mlflow_accepts_them(rendered):
    from mlflow.server.security_utils import is_allowed_host_header

    _, default = rendered["default"]
    assert not by_kind(default, "Ingress")
    assert not is_allowed_host_header(_hosts(default), "mlflow.ml.example.org")

    _, objects = rendered["ingress"]
    ingress = one(objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt"}
    assert ingress["spec"]["tls"] == [{"secretName": "mlflow-tls", "hosts": ["mlflow.ml.example.org"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "mlflow.ml.example.org"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    service = one(objects, "Service")
    assert path["backend"]["service"]["name"] == service["metadata"]["name"] == MLFLOW_SVC
    assert path["backend"]["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    hosts = _hosts(objects)
    assert is_allowed_host_header(hosts, "mlflow.ml.example.org")
    assert not is_allowed_host_header(hosts, "evil.example.org")


# ------------------------------------------------------------------------------- metrics
def test_metrics_are_served_from_an_emptydir_and_scrapable_by_pod_ip(rendered):
    from mlflow.server.security_utils import is_allowed_host_header

    _, default = rendered["default"]
    mlflow = container_named(default, "Deployment", "mlflow")
    assert "--expose-prometheus" not in cli_args(mlflow)
    assert not is_allowed_host_header(_hosts(default), "10.42.0.7:5000")

    for variant in ("metrics", "service-monitor"):  # a ServiceMonitor turns metrics on
        _, objects = rendered[variant]
        mlflow = container_named(objects, "Deployment", "mlflow")
        directory = flag_value(cli_args(mlflow), "--expose-prometheus")
        volumes = {v["name"]: v for v in pod_spec(one(objects, "Deployment"))["volumes"]}
        mount = next(m for m in mlflow["volumeMounts"] if directory.startswith(m["mountPath"] + "/"))
        assert "emptyDir" in volumes[mount["name"]], f"{variant}: {directory} is not on an emptyDir"
        hosts = _hosts(objects)
        for pod_ip in ("10.42.0.7:5000", "172.20.3.4:5000", "192.168.1.9:5000"):
            assert is_allowed_host_header(hosts, pod_ip), (variant, pod_ip)
        assert not is_allowed_host_header(hosts, "8.8.8.8:5000") and "*" not in hosts
    assert not by_kind(rendered["metrics"][1], "ServiceMonitor")


def test_service_monitor_selects_the_mlflow_service_port(rendered):
    _, objects = rendered["service-monitor"]
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["path"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("/metrics", "15s", "10s")


def test_service_monitor_schema_rejects_a_misspelt_field(rendered):
    """Negative control of the checked-in CRD subset schema (the positive one: test_chart's validation)."""
    import jsonschema

    schema = json.loads((SCHEMAS / "servicemonitor-v1.json").read_text())
    monitor = one(rendered["service-monitor"][1], "ServiceMonitor")
    jsonschema.validate(monitor, schema, cls=jsonschema.Draft7Validator)
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["endpoints"][0]["scrapeTimout"] = bad["spec"]["endpoints"][0].pop("scrapeTimeout")
    with pytest.raises(jsonschema.ValidationError, match="scrapeTimout"):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)


# ------------------------------------------------------------------------- extras and probes
def test_extra_args_env_and_volumes_reach_the_server_and_the_migration(rendered):
    _, objects = rendered["extras"]
    mlflow = container_named(objects, "Deployment", "mlflow")
    argv = cli_args(mlflow)
    assert argv[-2:] == ["--gunicorn-opts", "--timeout 120"]  # after the chart's own flags
    assert flag_value(argv, "--backend-store-uri") == "$(MLFLOW_BACKEND_STORE_URI)"
    for where, container, spec in (
        ("server", mlflow, pod_spec(one(objects, "Deployment"))),
        ("migration", _upgrade_container(objects), pod_spec(job(objects, "mlflow-db-upgrade"))),
    ):
        env = env_of(container)
        assert env["PGSSLROOTCERT"]["value"] == "/etc/db-ca/ca.crt", where
        assert env["PGSSLPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db-ca", "key": "passphrase"}, (
            where
        )
        assert {"name": "db-ca", "mountPath": "/etc/db-ca", "readOnly": True} in container["volumeMounts"], (
            where
        )
        assert {"name": "db-ca", "configMap": {"name": "db-ca"}} in spec["volumes"], where
    _, default = rendered["default"]
    assert "PGSSLROOTCERT" not in env_of(container_named(default, "Deployment", "mlflow"))


def test_probe_timings_come_from_values(rendered):
    default = container_named(rendered["default"][1], "Deployment", "mlflow")
    extras = container_named(rendered["extras"][1], "Deployment", "mlflow")
    assert default["livenessProbe"]["periodSeconds"] == 20 and extras["livenessProbe"]["periodSeconds"] == 30
    assert extras["readinessProbe"]["failureThreshold"] == 6
    assert extras["startupProbe"] == default["startupProbe"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert extras[probe]["httpGet"] == {"path": "/health", "port": "http"}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"mlflow.ingress.enabled": "true"}, "/mlflow/ingress/hosts"),
        (
            {"mlflow.ingress.hosts[0].host": "Bad_Host", "mlflow.ingress.hosts[0].paths[0].path": "/"},
            "/mlflow/ingress",
        ),
        ({"mlflow.ingress.className": "Nginx!"}, "/mlflow/ingress/className"),
        (
            {"mlflow.extraEnv[0].name": "DB_PASSWORD", "mlflow.extraEnv[0].value": "hunter2"},
            "/mlflow/extraEnv/0",
        ),
        (
            {"mlflow.extraVolumeMounts[0].name": "x", "mlflow.extraVolumeMounts[0].mountPath": "rel"},
            "mountPath",
        ),
        ({"mlflow.metrics.serviceMonitor.interval": "often"}, "/mlflow/metrics/serviceMonitor/interval"),
        ({"mlflow.probes.liveness.periodSeconds": "0"}, "/mlflow/probes/liveness/periodSeconds"),
        ({"mlflow.migrations.bogus": "1"}, "additional properties 'bogus' not allowed"),
    ],
)
def test_schema_rejects_bad_deployment_values(helm, sets, message):
    result = helm_template(helm, sets, release=RELEASE, namespace=NAMESPACE)
    assert result.returncode != 0, f"{sets} was accepted"
    assert "schema" in result.stderr and message in result.stderr, result.stderr


def test_schema_accepts_a_secret_looking_env_var_by_reference(helm):
    """Positive control beside the literal-password rejection above."""
    sets = {
        "mlflow.extraEnv[0].name": "DB_PASSWORD",
        "mlflow.extraEnv[0].valueFrom.secretKeyRef.name": "db",
        "mlflow.extraEnv[0].valueFrom.secretKeyRef.key": "password",
    }
    assert helm_template(helm, sets, release=RELEASE, namespace=NAMESPACE).returncode == 0


# ---------------------------------------------------------------------------------- NOTES
def _notes(helm, *sets: str) -> str:
    cmd = [helm, "install", RELEASE, CHART_DIR, "--namespace", NAMESPACE, "--dry-run=client"]
    for pair in sets:
        cmd += ["--set", pair]
    result = run(cmd)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def _kubectl_commands(notes: str) -> dict[str, list[str]]:
    """{secret name: argv} of every `kubectl ... create secret generic NAME` command in the NOTES, with
    backslash continuations joined and trailing comments dropped: what a shell would run."""
    joined = re.sub(r"\\\n\s*", " ", notes)
    commands = {}
    for line in joined.splitlines():
        if "create secret generic" in line:
            argv = shlex.split(line.split("#", 1)[0])
            commands[argv[argv.index("generic") + 1]] = argv
    return commands


def _literals(argv: list[str]) -> dict[str, str]:
    pairs = [a.split("=", 1)[1] for a in argv if a.startswith("--from-literal=")]
    return dict(pair.split("=", 1) for pair in pairs)


def test_notes_give_copy_paste_secret_commands_for_every_pipeline_task(helm):
    commands = _kubectl_commands(_notes(helm))
    mlflow = commands[MLFLOW_SECRET]
    assert mlflow[:3] == ["kubectl", "-n", "kubeflow"]  # single-user KFP runs its pods in kubeflow
    literals = _literals(mlflow)
    assert set(literals) == set(MLFLOW_KEYS)  # every key the tasks require (optional=False)
    assert literals["MLFLOW_TRACKING_URI"] == MLFLOW_URL
    assert set(_literals(commands[S3_SECRET])) == set(S3_KEYS)
    assert {"tgrl-mlflow-db", "tgrl-mlflow-s3"} <= set(commands)  # the server's own

    team = _kubectl_commands(_notes(helm, "schedule.kfp.namespace=team-a", "mlflow.basicAuth.enabled=true"))
    assert team[MLFLOW_SECRET][:3] == ["kubectl", "-n", "team-a"] and "tgrl-mlflow-auth" in team
    assert _literals(team[MLFLOW_SECRET])["MLFLOW_TRACKING_USERNAME"]


def test_notes_name_the_migration_job_ingress_and_metrics(helm):
    notes = _notes(helm)
    assert f"kubectl -n {NAMESPACE} logs job/{RELEASE}-mlflow-db-upgrade" in notes
    off = _notes(helm, "mlflow.migrations.enabled=false")
    assert (
        'mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"' in off
        and "logs job/tgrl-mlflow-db-upgrade" not in off
    )
    ingress = [f"{k}={v}" for k, v in VARIANTS["ingress"].items()]
    assert "https://mlflow.ml.example.org/" in _notes(helm, *ingress)
    assert "/metrics" in _notes(helm, "mlflow.metrics.serviceMonitor.enabled=true")


# ----------------------------------------------------------------------------- chart README
def _leaf_paths(values: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            paths |= _leaf_paths(value, path + ".")
        else:
            paths.add(path)
    return paths


def test_chart_readme_documents_every_value(helm):
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    readme = (CHART_DIR / "README.md").read_text()
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    leaves = _leaf_paths(values)
    # a row may document a whole small object (e.g. `mlflow.probes.liveness`) instead of its leaves
    undocumented = {p for p in leaves if not any(p == r or p.startswith(r + ".") for r in rows)}
    assert not undocumented, f"values without a row in charts/tgrl/README.md: {sorted(undocumented)}"
    stale = {r for r in rows if not any(p == r or p.startswith(r + ".") for p in leaves)}
    assert not stale, f"README rows for values that do not exist: {sorted(stale)}"
