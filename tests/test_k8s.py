"""k8s/ holds objects a Kubernetes API server with KubeRay's CRDs accepts, and they run real `ssm` commands in
the image k8s/Dockerfile builds.

The schemas are KubeRay's published CustomResourceDefinitions (../shared/schemas/kuberay, beside the
repository's checkout). An API server also rejects fields its schema does not name (`kubectl apply` validates
strictly), which a plain JSON Schema allows, so the validator here closes every object that lists its fields.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import typer
import typer.main
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cli import app

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
# Kinds from the core API that k8s/ may hold beside KubeRay's; they have no schema in SCHEMAS.
CORE_KINDS = {"ServiceAccount": "v1"}
SERVE_BUILDER = "jobs.serve:build_app"
# click's usage error, whether typer uses click or carries its own copy of it (newer typer).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
S3_SECRET = "ssm-s3"

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each


def _documents() -> list[tuple[str, int, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.load_all(path.read_text(), Loader=YamlLoader)):
            if doc is not None:
                found.append((path.name, i, doc))
    return found


DOCUMENTS = _documents()
KUBERAY = [doc for _, _, doc in DOCUMENTS if doc.get("kind") in CRD_FILES]


def _by_kind(kind: str) -> list[dict]:
    return [doc for doc in KUBERAY if doc["kind"] == kind]


def _cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayJob or RayService (or a RayCluster's own spec)."""
    return {"RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"],
            "RayCluster": lambda s: s}[doc["kind"]](doc["spec"])


def _pod_specs(doc: dict) -> dict[str, dict]:
    """The pod specs of a KubeRay object by group: 'head' and each worker group's name."""
    cluster = _cluster_spec(doc)
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])})
    return pods


def _closed(schema):
    """`schema` with additionalProperties: false on every object that lists its fields (an API server drops or,
    validating strictly, rejects unknown fields; JSON Schema would let them through)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validators(kind: str) -> dict[str, jsonschema.protocols.Validator]:
    """The validator of each version of `kind` that KubeRay's CRD serves."""
    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=YamlLoader)
    assert crd["spec"]["names"]["kind"] == kind
    # OpenAPI v3.0's schema objects are JSON Schema draft 4 plus extensions (x-kubernetes-*) that it ignores.
    return {v["name"]: jsonschema.Draft4Validator(_closed(v["schema"]["openAPIV3Schema"]))
            for v in crd["spec"]["versions"] if v.get("served")}


def schema_errors(doc: dict) -> list[str]:
    """Every reason KubeRay's CRD rejects `doc`, as 'path: message' lines (empty when it accepts it)."""
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    validators = _validators(doc["kind"])
    if group != "ray.io" or version not in validators:
        return [f"apiVersion: {doc.get('apiVersion')!r} is not served by KubeRay's CRD (ray.io/ with one of "
                f"{sorted(validators)})"]
    errors = validators[version].iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors)


@pytest.fixture(scope="module")
def schemas() -> Path:
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay's CRD schemas are not at {SCHEMAS} (the shared folder beside the checkout)")
    return SCHEMAS


def test_k8s_holds_the_jobs_and_the_service():
    kinds = sorted(doc["kind"] for doc in KUBERAY)
    assert kinds == ["RayJob", "RayJob", "RayService"], kinds
    commands = sorted(shlex.split(doc["spec"]["entrypoint"])[1] for doc in _by_kind("RayJob"))
    assert commands == ["score", "train"]


@pytest.mark.parametrize("name,index,doc", DOCUMENTS, ids=[f"{n}[{i}]" for n, i, _ in DOCUMENTS])
def test_manifest_is_accepted_by_its_schema(schemas, name, index, doc):
    kind = doc.get("kind")
    name_ = doc.get("metadata", {}).get("name", "")
    # Object names are DNS labels; KubeRay derives Services and pods from them, so keep them short.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name_) and len(name_) <= 40, f"{name}: name {name_!r}"
    if kind in CORE_KINDS:
        assert doc["apiVersion"] == CORE_KINDS[kind]
        return
    assert kind in CRD_FILES, f"{name}: kind {kind!r} is neither KubeRay's nor one of {sorted(CORE_KINDS)}"
    assert schema_errors(doc) == [], f"{name} document {index}"


@pytest.mark.parametrize("break_it,where", [
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplica=8),
     "rayClusterSpec/workerGroupSpecs/0: Additional properties are not allowed ('maxReplica' was unexpected)"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas="0"),
     "rayClusterSpec/workerGroupSpecs/0/minReplicas: '0' is not of type 'integer'"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].pop("containers"),
     "rayClusterSpec/headGroupSpec/template/spec: 'containers' is a required property"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
     ["limits"].update(cpu="four"), "containers/0/resources/limits/cpu: 'four' does not match"),
    (lambda d: d["spec"].update(shutdownAfterJobFinishes="yes"),
     "spec/shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"),
    (lambda d: d.update(apiVersion="ray.io/v2"), "apiVersion: 'ray.io/v2' is not served"),
])
def test_validator_rejects_a_broken_manifest(schemas, break_it, where):
    job = copy.deepcopy(_by_kind("RayJob")[0])
    assert schema_errors(job) == []
    break_it(job)
    errors = schema_errors(job)
    assert any(where in e for e in errors), errors


def _parse(argv: list[str]) -> tuple[str, dict]:
    """Parse `ssm ...` as the CLI does; a misspelled flag or a bad value raises the CLI's usage error."""
    assert argv[0] == "ssm", f"the command must be the ssm CLI, got {argv[0]!r}"
    group = typer.main.get_command(app)
    command = group.commands.get(argv[1])
    assert command is not None, f"`ssm {argv[1]}` is not a command (ssm has {sorted(group.commands)})"
    with command.make_context(argv[1], argv[2:]) as ctx:
        return argv[1], ctx.params


@pytest.mark.parametrize("doc", _by_kind("RayJob"), ids=lambda d: d["metadata"]["name"])
def test_job_runs_a_real_ssm_command_on_s3(doc):
    command, params = _parse(shlex.split(doc["spec"]["entrypoint"]))
    # Pods share no disk: data, checkpoints and output all live on S3.
    paths = [params["out"]] + ([params["data"]] if command == "train" else [*params["inputs"], params["checkpoint"]])
    assert all(p.startswith("s3://") for p in paths), paths
    # The GPU workers start at zero: only jobs that ask for GPUs make the autoscaler add them (score's default
    # looks at the cluster's GPUs at the start, when there are none).
    assert params["gpus_per_worker"] and params["gpus_per_worker"] >= 1
    assert params["address"] is None, "the job's driver joins its cluster through RAY_ADDRESS"


def test_the_parser_rejects_what_the_cli_rejects():
    with pytest.raises(UsageError, match="No such option: --worker"):
        _parse(["ssm", "score", "s3://b/in", "--checkpoint", "s3://b/run", "--out", "s3://b/o", "--worker", "2"])
    with pytest.raises(typer.BadParameter, match="valid integer"):
        _parse(["ssm", "train", "s3://b/data", "--epochs", "fifty"])
    with pytest.raises(AssertionError, match="not a command"):
        _parse(["ssm", "trian", "s3://b/data"])


def test_service_deploys_the_serve_application():
    from ray.serve.schema import ServeDeploySchema

    (service,) = _by_kind("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what the Serve controller accepts from KubeRay
    (application,) = config["applications"]
    assert application["import_path"] == SERVE_BUILDER
    assert application["args"]["checkpoint"].startswith("s3://")
    assert application["args"]["batch_size"] >= 1


def test_serve_builder_takes_the_settings_of_ssm_serve():
    module, _, name = SERVE_BUILDER.partition(":")
    if not (ROOT / (module.replace(".", "/") + ".py")).exists():
        pytest.skip(f"{module} is not in this checkout yet: the RayService imports {SERVE_BUILDER}")
    assert callable(getattr(importlib.import_module(module), name, None)), \
        f"k8s/serve-rayservice.yaml imports {SERVE_BUILDER}, which {module} does not define"
    # The builder's args are `ssm serve`'s settings under their own names: CHECKPOINT --batch-size ...
    (service,) = _by_kind("RayService")
    args = dict(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"])
    argv = ["ssm", "serve", args.pop("checkpoint")]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    _, params = _parse(argv)
    assert {key: params[key] for key in args} == args


def test_pods_have_their_resources_and_s3_credentials():
    accounts = {doc["metadata"]["name"] for _, _, doc in DOCUMENTS if doc["kind"] == "ServiceAccount"}
    for doc in KUBERAY:
        cluster = _cluster_spec(doc)
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        pods = _pod_specs(doc)
        assert cluster["enableInTreeAutoscaling"] is True
        for group, pod in pods.items():
            where = f"{doc['metadata']['name']}/{group}"
            assert pod["serviceAccountName"] in accounts, f"{where}: no ServiceAccount {pod['serviceAccountName']}"
            (container,) = pod["containers"]
            secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert secrets == [S3_SECRET], f"{where}: S3 credentials come from the Secret {S3_SECRET}"
            # Ray sizes each node from its container's limits; requests equal to them keep the pod where it fits.
            resources = container["resources"]
            assert resources["limits"] == resources["requests"], where
            assert {"cpu", "memory"} <= set(resources["limits"]), where
        gpus = {name: int(pods[name]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                for name in pods}
        assert gpus["head"] == 0, "no training worker or scoring actor may land on the head"
        assert gpus["gpu"] == 1 and gpus["cpu"] == 0, gpus
        assert any(t["key"] == "nvidia.com/gpu" for t in pods["gpu"].get("tolerations", []))
        for group in groups.values():
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        if doc["kind"] == "RayJob":  # a job's GPU nodes come and go with it
            assert groups["gpu"]["minReplicas"] == 0 and doc["spec"]["shutdownAfterJobFinishes"] is True


# --------------------------------------------------------------------------------------------------------
# The image


def _dockerfile() -> list[str]:
    """k8s/Dockerfile's instructions, one string each (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (K8S / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _declared(name: str) -> Requirement:
    """pyproject.toml's requirement on `name`."""
    return next(r for r in map(Requirement, PROJECT["dependencies"]) if r.name == name)


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([a-z][a-z0-9_-]*)(?:\[[a-z,]+\])?==([0-9][0-9a-z.+]*)", text))


def test_image_runs_the_ray_the_manifests_name():
    (base,) = [line.split()[1] for line in _dockerfile() if line.upper().startswith("FROM ")]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)", base)
    assert match, f"k8s/Dockerfile's base {base!r} is not a rayproject/ray:<version>-py3<minor> image"
    ray_version, python = match.group(1), f"3.{match.group(2)}"
    assert SpecifierSet(PROJECT["requires-python"]).contains(python), f"the image's Python {python}"
    assert _declared("ray").specifier.contains(ray_version), f"pyproject.toml's {_declared('ray')} excludes {base}"
    assert _pins(" ".join(_dockerfile())).get("ray") == ray_version, "pip must keep the base image's Ray"
    images = set()
    for doc in KUBERAY:
        assert _cluster_spec(doc)["rayVersion"] == ray_version, doc["metadata"]["name"]
        images |= {c["image"] for pod in _pod_specs(doc).values() for c in pod["containers"]}
    assert len(images) == 1, f"every pod of every manifest should run the one image, they name {sorted(images)}"
    (image,) = images
    assert image.rpartition(":")[2].endswith(f"-ray{ray_version}"), image
    assert f"-t {image} " in (K8S / "Dockerfile").read_text(), "the build command in k8s/Dockerfile tags it so"


def test_image_installs_the_pinned_torch_and_the_project():
    steps = _dockerfile()
    ci_pins = _pins((ROOT / ".ci" / "run").read_text())
    torch_step = next(i for i, s in enumerate(steps) if "torch==" in s)
    pins = _pins(steps[torch_step])
    assert {k: pins.get(k) for k in ("torch", "torchvision")} == {k: ci_pins[k] for k in ("torch", "torchvision")}
    for name in ("torch", "torchvision"):
        assert _declared(name).specifier.contains(pins[name]), f"pyproject's {_declared(name)} excludes {pins[name]}"

    # The project is installed after torch (so pip keeps the pinned build) from what the COPY steps bring in.
    copies = [s.split()[1:] for s in steps if s.upper().startswith("COPY ")]
    sources = {src for args in copies for src in args[:-1] if not src.startswith("--")}
    needed = {"pyproject.toml", PROJECT["readme"], "cli.py", "ssm", "jobs"}
    assert needed <= sources, f"k8s/Dockerfile does not copy {sorted(needed - sources)}"
    install = next(i for i, s in enumerate(steps) if s.startswith("RUN pip install") and "/tmp/ssm " in s + " ")
    assert install > torch_step
    assert all(args[-1].startswith("/tmp/ssm/") for args in copies)
    # .dockerignore lets each copied path into the build context (the last pattern that matches decides).
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for source in needed:
        verdicts = [not p.startswith("!") for p in patterns if _dockerignore_match(p.lstrip("!"), source)]
        assert not verdicts or verdicts[-1] is False, f".dockerignore keeps {source} out of the build context"


def _dockerignore_match(pattern: str, path: str) -> bool:
    """Whether a .dockerignore pattern matches a top-level path (Docker's rules, for top-level names)."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.removeprefix("**/"))
