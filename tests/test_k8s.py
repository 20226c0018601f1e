"""k8s/: every overlay renders with `kubectl kustomize`, validates against the Kubernetes and KubeRay schemas,
and keeps the invariants users rely on (entrypoint, scale, GPUs, secrets, /dev/shm, non-root, pinned images)."""

import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest
import yaml

from dcgan_dist.config import build_config, presets, split_args

from .conftest import ROOT

OVERLAYS = ["cpu-smoke", "gpu", "raycluster"]
SCHEMA_DIR = ROOT.parent / "shared" / "k8s-schemas"
K8S_VERSION = "1.32.0"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}

if shutil.which("kubectl") is None:
    pytest.skip(
        "kubectl is not installed (apt-get install -y kubectl): manifests not rendered", allow_module_level=True
    )
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")


def render(path) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def strict(schema):
    """Reject unknown keys: add additionalProperties: false wherever an object lists its properties."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def kuberay_validators():
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay schemas not found at {SCHEMA_DIR}")
    return {
        kind: jsonschema.Draft7Validator(
            strict(json.loads((SCHEMA_DIR / f"{kind.lower()}-ray.io-v1.json").read_text()))
        )
        for kind in ("RayJob", "RayCluster")
    }


def validate(obj: dict, kuberay_validators) -> None:
    if obj["apiVersion"] == "ray.io/v1":
        kuberay_validators[obj["kind"]].validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(ROOT / "k8s" / "overlays" / request.param)


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict) -> list[dict]:
    spec = cluster_spec(obj)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def ray_objects(objects):
    return [o for o in objects if o["apiVersion"] == "ray.io/v1"]


def test_every_object_validates(rendered, kuberay_validators):
    name, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert kinds & {"RayJob", "RayCluster"}, kinds
    for obj in objects:
        validate(obj, kuberay_validators)
    for obj in ray_objects(objects):
        if obj["kind"] == "RayJob":
            assert obj["spec"].get("submissionMode", "K8sJobMode") in SUBMISSION_MODES  # no enum in the schema


def test_broken_manifests_fail_validation(kuberay_validators):
    objects = render(ROOT / "k8s" / "overlays" / "gpu")
    job = copy.deepcopy(next(o for o in objects if o["kind"] == "RayJob"))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"  # wrong type
    with pytest.raises(jsonschema.ValidationError):
        validate(job, kuberay_validators)
    typo = copy.deepcopy(next(o for o in objects if o["kind"] == "RayJob"))
    typo["spec"]["shutdownAfterJobFinish"] = True  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        validate(typo, kuberay_validators)
    job = copy.deepcopy(render(ROOT / "k8s" / "overlays" / "data")[0])
    job["spec"]["template"]["spec"]["containers"][0]["envFrom"] = {"secretRef": {"name": "x"}}  # not a list
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job, kuberay_validators)


def entrypoint_config(job: dict):
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "dcgan_dist.train"], args
    config_file, overrides = split_args(args[3:])
    assert config_file in presets()  # a preset by name: configs/ is in the image
    return build_config(config_file, overrides)  # a valid command line


def workers_per_pod(group: dict, cfg) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    if cfg.train.device == "cuda":
        return int(limits["nvidia.com/gpu"])
    cpus = int(group.get("rayStartParams", {}).get("num-cpus", math.floor(float(limits["cpu"]))))
    return cpus // cfg.dist.cpus_per_worker


def test_rayjob_entrypoint_and_scale(rendered):
    name, objects = rendered
    for job in (o for o in objects if o["kind"] == "RayJob"):
        cfg = entrypoint_config(job)
        assert cfg.dist.launcher == "ray"
        groups = cluster_spec(job)["workerGroupSpecs"]
        total = sum(g["replicas"] * workers_per_pod(g, cfg) for g in groups)
        assert cfg.dist.num_workers == total, (cfg.dist.num_workers, total)
        for g in groups:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        # Elastic training's bounds are the worker group's: min/max pods x Ray Train workers per pod.
        fewest = sum(g["minReplicas"] * workers_per_pod(g, cfg) for g in groups)
        most = sum(g["maxReplicas"] * workers_per_pod(g, cfg) for g in groups)
        assert (cfg.dist.min_workers or cfg.dist.num_workers, cfg.dist.num_workers) == (fewest, most)
        assert cluster_spec(job)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no training on the head
        if name == "gpu":
            assert cfg.train.device == "cuda" and cfg.dist.sync_bn
            assert 0 < cfg.dist.min_workers < cfg.dist.num_workers  # elastic: a preempted pod does not stall the run
            assert all(
                int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
                for g in groups
            )
            # Shards and every run file in the bucket, whose keys (and endpoint) come from the Secret dcgan-s3.
            assert cfg.data.shards.startswith("s3://") and cfg.run.dir.startswith("s3://") and not cfg.dist.storage_path
            for template in pod_templates(job):
                assert template["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "dcgan-s3"}}]
        if name == "cpu-smoke":
            assert cfg.train.device != "cuda" and cfg.data.shards == "" and total == 2  # synthetic faces, 2 workers


def test_pods_are_safe_and_pinned(rendered):
    _, objects = rendered
    assert not [o for o in objects if o["kind"] == "Secret"]  # credentials never live in the manifests
    for obj in ray_objects(objects):
        assert cluster_spec(obj)["authOptions"]["mode"] == "token"
        for template in pod_templates(obj):
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert len(shm) == 1
            for container in spec["containers"]:
                assert re.fullmatch(r"[\w./-]+:[\w.-]+", container["image"]) and not container["image"].endswith(
                    ":latest"
                )
                assert container["resources"]["requests"] and container["resources"]["limits"]
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
                assert mounts[shm[0]["name"]] == "/dev/shm"
                for env in container.get("env", []):
                    if re.search(r"KEY|TOKEN|PASSWORD|SECRET", env["name"]):
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_gpu_overlay_reads_the_wandb_key_from_a_secret():
    objects = render(ROOT / "k8s" / "overlays" / "gpu")
    job = next(o for o in objects if o["kind"] == "RayJob")
    for template in pod_templates(job):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}
    assert entrypoint_config(job).wandb.mode == "online"
    worker_env = {
        e["name"] for e in cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    }
    assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"} <= worker_env


def test_worker_pods_stop_training_gracefully(rendered):
    """A deleted or preempted worker pod: preStop SIGTERMs the Ray Train workers (graceful stop, checkpoint) within a
    grace period that leaves time for it; the head gives `ray job stop` as long."""
    _, objects = rendered
    for obj in ray_objects(objects):
        spec = cluster_spec(obj)
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert pod["terminationGracePeriodSeconds"] >= 60
            command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
            assert "pkill -TERM -f '^ray::RayTrainWorker'" in command[-1]
        head_env = {
            e["name"]: e.get("value") for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert int(head_env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60


def test_the_prestop_hook_stops_the_training_workers_and_waits_for_them(tmp_path):
    """The hook's shell, run for real against stand-ins for Ray Train workers that take 2 s to stop after SIGTERM
    and write a file as their last act: it signals them, waits until they are gone (their files are there when it
    returns), and does not match itself. (The process name is made unique for the test, so that no real Ray worker
    on this machine is touched.)"""
    objects = render(ROOT / "k8s" / "overlays" / "cpu-smoke")
    job = next(o for o in objects if o["kind"] == "RayJob")
    container = cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    name = f"ray::RayTrainWorker-test{os.getpid()}"
    command = [part.replace("ray::RayTrainWorker", name) for part in command]
    worker = tmp_path / "worker.sh"  # $1: its files' prefix
    worker.write_text(
        'trap \'sleep 2; touch "$1.stopped"; exit 0\' TERM\ntouch "$1.ready"\nwhile :; do sleep 0.1; done\n'
    )
    workers = [subprocess.Popen(["bash", "-c", f"exec -a {name} bash {worker} {tmp_path / str(i)}"]) for i in range(2)]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"{i}.ready").exists() for i in range(2)):  # their SIGTERM trap is set
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "the stand-ins did not start"
        time.sleep(0.02)
    hook = subprocess.run(command, timeout=60)
    assert hook.returncode == 0
    assert all((tmp_path / f"{i}.stopped").exists() for i in range(2))  # the hook waited for their last act
    assert all(w.poll() == 0 for w in workers)  # stopped by the SIGTERM, cleanly


def test_no_claims_and_the_image_named_in_one_place(rendered):
    """No PersistentVolumeClaims (most storage classes cannot give ReadWriteMany), and every container runs the
    image that k8s/image names, the only file under k8s/ that says which registry."""
    _, objects = rendered
    image = yaml.safe_load((ROOT / "k8s" / "image" / "kustomization.yaml").read_text())["images"]
    allowed = {f"{i['newName']}:{i['newTag']}" for i in image}
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    for obj in ray_objects(objects):
        for template in pod_templates(obj):
            assert not [v for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v]
            assert {c["image"] for c in template["spec"]["containers"]} <= allowed
    registry = image[0]["newName"].split("/")[0]
    mentions = [p for p in (ROOT / "k8s").rglob("*.yaml") if registry in p.read_text()]
    assert mentions == [ROOT / "k8s" / "image" / "kustomization.yaml"], mentions


def test_the_data_job_fills_the_bucket_the_gpu_job_reads():
    """Step 1 of the gpu overlay: a Job whose command is a valid `dcgan_dist.data` command line writing the shards
    that the RayJob's data.shards names, with the bucket's keys from the same Secret."""
    [job] = render(ROOT / "k8s" / "overlays" / "data")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["python", "-m", "dcgan_dist.data"] and command[3] in ("synth", "convert")
    out = command[command.index("--out") + 1]
    rayjob = next(o for o in render(ROOT / "k8s" / "overlays" / "gpu") if o["kind"] == "RayJob")
    assert entrypoint_config(rayjob).data.shards == out
    assert container["envFrom"] == [{"secretRef": {"name": "dcgan-s3"}}]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
