"""The Helm chart charts/tgrl, offline: `helm lint --strict`, `helm template` under several value sets,
every rendered object validated against the Kubernetes schemas (kubernetes-validate, strict), and the
rendered objects read back to check what the chart promises: non-root read-only pods, secrets only
by reference, the MLflow server's command line, the schedule Job's `tgrl schedule replace` call
(parsed by the real tgrl CLI), a pipeline recipe the real config loader accepts, and a strict schema.

helm comes from scripts/install-tools.sh (CI runs it before pytest). Without helm the tests skip,
except under CI, where a missing helm is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from chart_values import (
    BASE_KINDS,
    EXTRA_KINDS,
    MLFLOW_SVC,
    MLFLOW_URL,
    NAMESPACE,
    RELEASE,
    VARIANTS,
    container_named,
    env_of,
    job,
    one,
    pod_spec,
    render_chart,
    validate,
)
from infra_tools import (
    CHART_DIR,
    KUBERNETES_VERSION,
    by_kind,
    cli_args,
    containers,
    find_venv_tool,
    flag_value,
    helm_template,
    pod_specs,
    run,
)

from tgrl_lib.config import PipelineConfig
from tgrl_lib.recipe import load_config

CONTRACT = [  # the exact leading command line of the schedule Job (flag spelling is the contract)
    "tgrl", "schedule", "replace",
    "--host", "http://ml-pipeline.kubeflow.svc.cluster.local:8888",
    "--name", "tgrl-nightly",
    "--cron", "0 0 3 * * *",
    "--pipeline", "tgrl_pipeline",
    "--config", "/etc/tgrl/pipeline.yaml",
    "--experiment", "tgrl",
    "--max-concurrency", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def rendered(helm):
    """{variant: (text, objects)} for every value set in VARIANTS."""
    return {name: render_chart(helm, sets) for name, sets in VARIANTS.items()}


# ------------------------------------------------------------------------------ lint and validity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(helm, variant):
    cmd = [helm, "lint", "--strict", CHART_DIR, "--namespace", NAMESPACE]
    for key, value in VARIANTS[variant].items():
        cmd += ["--set", f"{key}={value}"]
    result = run(cmd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_pass_strict_kubernetes_validation(rendered, tmp_path, variant):
    text, objects = rendered[variant]
    assert {o["kind"] for o in objects} == BASE_KINDS | EXTRA_KINDS.get(variant, set())
    validate(text, objects, tmp_path)  # ServiceMonitor (a CRD): against tests/schemas/, see chart_values


def test_validator_rejects_an_unknown_field(rendered, tmp_path):
    """Negative control: strict validation would catch a misspelt field in a container spec."""
    text, _ = rendered["default"]
    assert "readOnlyRootFilesystem: true" in text
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(text.replace("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", 1))
    result = run([find_venv_tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", manifest])
    assert result.returncode != 0
    assert "readOnlyRootFileSystem" in result.stdout + result.stderr


# ----------------------------------------------------------------------------------- pod security
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_container_is_non_root_read_only_and_bounded(rendered, variant):
    _, objects = rendered[variant]
    specs = pod_specs(objects)
    assert {name.split("/")[0] for name, _ in specs} == {"Deployment", "Job"}
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in containers(spec):
            at = f"{where} container {c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, at
            assert sc["readOnlyRootFilesystem"] is True, at
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is False, at
            assert sc["capabilities"] == {"drop": ["ALL"]}, at
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, at
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{at}: {bound}"
            # Every writable path is a volume; a main container always has /tmp.
            for mount in c.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                assert mount.get("readOnly") or "emptyDir" in volume, f"{at}: {mount['mountPath']} writable"
            if c in spec["containers"]:
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{at}: no emptyDir at /tmp"


def test_mlflow_probes_use_health(rendered):
    _, objects = rendered["default"]
    mlflow = container_named(objects, "Deployment", "mlflow")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mlflow[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert mlflow["workingDir"] == "/mlflow"
    assert "/mlflow" in {m["mountPath"] for m in mlflow["volumeMounts"]}


# --------------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_secrets_only_by_reference(rendered, variant):
    text, objects = rendered[variant]
    assert not by_kind(objects, "Secret"), "the chart must not create Secrets: it references existing ones"
    for marker in ("postgresql://", "postgres://", "password=", "AKIA"):
        assert marker not in text, f"{marker!r} appears in the rendered manifests"
    secretish = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "STORE_URI", "DATABASE_URI", "USERNAME")
    for where, spec in pod_specs(objects):
        for c in containers(spec):
            for env in c.get("env", []):
                if any(word in env["name"] for word in secretish) and not env["name"].endswith("_PATH"):
                    assert "value" not in env, f"{where}/{c['name']}: {env['name']} has a literal value"
                    assert "secretKeyRef" in env["valueFrom"], f"{where}/{c['name']}: {env['name']}"


def test_backend_store_uri_reaches_mlflow_only_through_the_secret(rendered):
    _, objects = rendered["default"]
    mlflow = container_named(objects, "Deployment", "mlflow")
    argv = cli_args(mlflow)
    assert flag_value(argv, "--backend-store-uri") == "$(MLFLOW_BACKEND_STORE_URI)"
    ref = env_of(mlflow)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "tgrl-mlflow-db", "key": "uri"}
    env = env_of(mlflow)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "tgrl-mlflow-s3"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "tgrl-mlflow-s3"
    endpoint = env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
    assert endpoint["name"] == "tgrl-mlflow-s3" and endpoint["optional"] is True  # absent = AWS S3


def test_static_s3_keys_can_be_left_to_irsa(helm):
    _, objects = render_chart(helm, {"mlflow.artifacts.existingSecret": ""})
    env = env_of(container_named(objects, "Deployment", "mlflow"))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} & set(env)
    assert "MLFLOW_BACKEND_STORE_URI" in env


# ------------------------------------------------------------------------------------ MLflow server
def test_mlflow_server_command_line(rendered):
    _, objects = rendered["everything"]
    mlflow = container_named(objects, "Deployment", "mlflow")
    argv = cli_args(mlflow)
    assert argv[:2] == ["mlflow", "server"]
    assert flag_value(argv, "--host") == "0.0.0.0" and flag_value(argv, "--port") == "5000"
    assert flag_value(argv, "--artifacts-destination") == "s3://tgrl-mlflow/artifacts"
    assert "--serve-artifacts" in argv
    hosts = flag_value(argv, "--allowed-hosts").split(",")
    # The external name from values, the in-cluster names clients use, and localhost for port-forward.
    fqdn = f"{MLFLOW_SVC}.{NAMESPACE}.svc.cluster.local:*"
    for host in ("mlflow.example.com", fqdn, MLFLOW_SVC, "localhost:*"):
        assert host in hosts, host
    assert "*" not in hosts
    assert flag_value(argv, "--cors-allowed-origins") == "https://notebooks.example.com"
    env = env_of(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert mlflow["image"] == "ghcr.io/mlflow/mlflow:v3.17.2-full@sha256:" + "a" * 64


def test_allowed_hosts_match_the_tracking_uri_given_to_the_pipeline(rendered):
    """The URL the pipeline logs to must pass MLflow's own Host check (mlflow.server.security_utils)."""
    from urllib.parse import urlparse

    from mlflow.server.security_utils import is_allowed_host_header

    _, objects = rendered["default"]
    hosts = flag_value(cli_args(container_named(objects, "Deployment", "mlflow")), "--allowed-hosts").split(
        ","
    )
    config = yaml.safe_load(one(objects, "ConfigMap")["data"]["pipeline.yaml"])
    netloc = urlparse(config["tracking"]["tracking_uri"]).netloc
    assert is_allowed_host_header(hosts, netloc)
    assert is_allowed_host_header(hosts, "localhost:5000")
    assert not is_allowed_host_header(hosts, "evil.example.com")


def test_basic_auth_off_by_default_and_wired_when_on(rendered):
    _, default = rendered["default"]
    assert "--app-name" not in cli_args(container_named(default, "Deployment", "mlflow"))
    assert "initContainers" not in one(default, "Deployment")["spec"]["template"]["spec"]

    _, objects = rendered["basic-auth"]
    mlflow = container_named(objects, "Deployment", "mlflow")
    assert flag_value(cli_args(mlflow), "--app-name") == "basic-auth"
    env = env_of(mlflow)
    for name, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "tgrl-mlflow-auth", "key": key}
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    init = container_named(objects, "Deployment", "auth-config")
    # The auth tables live in the backend store's database unless another Secret is named.
    auth_db = env_of(init)["AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"]
    assert auth_db == {"name": "tgrl-mlflow-db", "key": "uri"}
    _, everything = rendered["everything"]
    init = container_named(everything, "Deployment", "auth-config")
    assert env_of(init)["AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth-db"
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth-config"]["emptyDir"]["medium"] == "Memory"


def test_auth_config_written_by_the_init_container_is_read_back_by_mlflow(rendered, tmp_path):
    """Run the init container's script, then MLflow's own reader on its output: a URL-encoded password
    ('%40') survives configparser's interpolation, and the admin comes from the environment."""
    _, objects = rendered["basic-auth"]
    init = container_named(objects, "Deployment", "auth-config")
    assert init["command"][:2] == ["python", "-c"]
    ini = tmp_path / "basic_auth.ini"
    script = init["command"][2].replace("/etc/mlflow-auth/basic_auth.ini", str(ini))
    uri = "postgresql://mlflow:p%40ss%25word@db.example:5432/mlflow"
    env = {**os.environ, "AUTH_DATABASE_URI": uri, "AUTH_DEFAULT_PERMISSION": "READ"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert oct(ini.stat().st_mode & 0o777) == "0o600"
    # MLflow's reader, loaded on its own: the auth package's __init__ needs the `auth` extra (Flask-WTF),
    # which the test environment does not have; the MLflow image does.
    reader = textwrap.dedent("""
        import importlib.util, json
        import mlflow.environment_variables
        spec = importlib.util.find_spec("mlflow")
        path = spec.submodule_search_locations[0] + "/server/auth/config.py"
        module_spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        c = module.read_auth_config()
        print(json.dumps([c.database_uri, c.default_permission, c.admin_username, c.admin_password]))
    """)
    env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin"}
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = "from-the-secret"
    out = subprocess.run(
        [sys.executable, "-c", reader], env=env, check=True, timeout=120, capture_output=True, text=True
    )
    assert yaml.safe_load(out.stdout) == [uri, "READ", "admin", "from-the-secret"]


# --------------------------------------------------------------------------------- schedule Job
def test_schedule_job_runs_the_replace_contract_after_install_and_upgrade(rendered):
    _, objects = rendered["default"]
    schedule = job(objects, "schedule")
    annotations = schedule["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    container = pod_spec(schedule)["containers"][0]
    argv = cli_args(container)
    assert argv[: len(CONTRACT)] == CONTRACT
    assert pod_spec(schedule)["restartPolicy"] == "Never"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/tgrl")
    volume = next(v for v in pod_spec(schedule)["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    assert "pipeline.yaml" in one(objects, "ConfigMap")["data"]


def test_schedule_job_arguments_parse_with_the_real_cli(rendered):
    from tgrl_lib.cli import build_parser

    _, objects = rendered["everything"]
    argv = cli_args(pod_spec(job(objects, "schedule"))["containers"][0])
    assert argv[0] == "tgrl"
    args = build_parser().parse_args(argv[1:])
    assert args.replace is True and args.func.__name__ == "_create_or_replace"
    assert (args.host, args.name, args.cron) == (CONTRACT[4], "tgrl-nightly", "0 0 3 * * *")
    assert (args.pipeline, args.config, args.experiment, args.max_concurrency) == (
        "tgrl_pipeline", "/etc/tgrl/pipeline.yaml", "tgrl", 1,
    )  # fmt: skip
    assert args.namespace == "team-a" and args.profile == "gpu"
    assert args.image == "registry.example/tgrl@sha256:" + "b" * 64 and args.cuda_image is None
    assert args.param == ["base_model=s3://models/qwen2.5-vl-3b"]
    assert args.service_account == "pipeline-runner"


def test_kfp_token_is_projected_only_when_asked(rendered):
    _, default = rendered["default"]
    spec = pod_spec(job(default, "schedule"))
    assert not any("projected" in v for v in spec["volumes"])
    _, objects = rendered["everything"]
    spec = pod_spec(job(objects, "schedule"))
    source = next(v for v in spec["volumes"] if "projected" in v)["projected"]["sources"][0]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    env = env_of(spec["containers"][0])
    assert env["KF_PIPELINES_SA_TOKEN_PATH"]["value"] == "/var/run/secrets/kubeflow/pipelines/token"


def test_schedule_can_be_turned_off(helm):
    _, objects = render_chart(helm, {"schedule.enabled": "false"})
    assert [j["metadata"]["labels"]["app.kubernetes.io/component"] for j in by_kind(objects, "Job")] == [
        "mlflow-db-upgrade"
    ]
    assert by_kind(objects, "Deployment")


def test_pipeline_config_loads_and_logs_to_this_mlflow(rendered, helm, tmp_path):
    _, objects = rendered["default"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(one(objects, "ConfigMap")["data"]["pipeline.yaml"])
    config = load_config(path, PipelineConfig)
    assert config.tracking.tracking_uri == MLFLOW_URL
    assert config.name == "nightly" and config.data.n_train == 512

    own = "http://mlflow.elsewhere:5000"
    _, objects = render_chart(helm, {"pipelineConfig.tracking.tracking_uri": own})
    path.write_text(one(objects, "ConfigMap")["data"]["pipeline.yaml"])
    assert load_config(path, PipelineConfig).tracking.tracking_uri == own


def test_notes_say_how_to_reach_mlflow_and_check_the_schedule(helm):
    install = [helm, "install", RELEASE, CHART_DIR, "--namespace", NAMESPACE, "--dry-run=client"]
    result = run([*install, "--set", "mlflow.basicAuth.enabled=true"])
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{MLFLOW_SVC} 5000:5000" in notes
    assert MLFLOW_URL in notes
    assert f"kubectl -n {NAMESPACE} logs job/tgrl-schedule" in notes
    assert "tgrl schedule list --host" in notes
    assert "MLFLOW_TRACKING_USERNAME" in notes


# ----------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bogus", "1", "additional properties 'bogus' not allowed"),
        ("mlflow.bogus", "1", "additional properties 'bogus' not allowed"),
        ("schedule.kfp.bogus", "1", "additional properties 'bogus' not allowed"),
        ("podSecurity.runAsUser", "0", "/podSecurity/runAsUser"),
        ("mlflow.image.tag", "latest", "/mlflow/image/tag"),
        ("schedule.cron", "0 3 * * *", "/schedule/cron"),
        ("mlflow.artifacts.destination", "gs://bucket", "/mlflow/artifacts/destination"),
        ("schedule.pipeline", "no_such_pipeline", "/schedule/pipeline"),
    ],
)
def test_schema_rejects_bad_values(helm, key, value, message):
    result = helm_template(helm, {key: value}, release=RELEASE, namespace=NAMESPACE)
    assert result.returncode != 0, f"--set {key}={value} was accepted"
    assert "schema" in result.stderr and message in result.stderr, result.stderr
