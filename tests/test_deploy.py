"""deploy/ checked against the project: every YAML parses; RayJob entrypoints name real jobs and confs and parse
with the jobs' own command lines; cluster sizes fit the configs they run; pins equal pyproject.toml's; secrets
only by reference; manifests valid against offline schemas; docs/CONFIG.md current. No Ray is started."""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from actprm_ray.config import Config, load_config
from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS
from script_loader import load_script

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
IMAGE_ROOT = "/opt/actprm"  # where deploy/Dockerfile puts the repository (WORKDIR)
CONFIGMAP = "actprm-env"
SECRET = "actprm-secrets"
SHARED_MOUNT = "/mnt/shared"
SHM_MOUNT = "/dev/shm"  # Ray's shared memory: the one emptyDir allowed (medium: Memory), never run state
RAYJOBS = ("active-train", "filter", "label", "evaluate")  # deploy/kuberay/rayjob-<name>.yaml
# The cluster launcher file cannot carry an annotation (its schema forbids unknown keys); its header says this.
LAUNCHER_SIZED_FOR = ("conf/cluster_7b.yaml", "active_train")
K8S_VERSION = "1.30"  # oldest Kubernetes the manifests target; kubernetes-validate picks that schema set


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifest(name: str) -> dict:
    (doc,) = _yaml_docs(KUBERAY / name)
    return doc


@lru_cache(maxsize=None)
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(requirement_prefix: str, reqs: list[str]) -> str:
    """The version spec of the requirement whose name (with extras) is `requirement_prefix`."""
    for r in reqs:
        if re.match(re.escape(requirement_prefix) + r"(?=[<>=!~])", r):
            return r[len(requirement_prefix):]
    raise AssertionError(f"{requirement_prefix} not in {reqs}")


# -- every YAML parses --------------------------------------------------------------------------------------------
ALL_YAML = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_deploy_holds_the_expected_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in ALL_YAML}
    expected = {"cluster.yaml", "kuberay/raycluster.yaml", "kuberay/storage.yaml", "kuberay/env.yaml"}
    expected |= {f"kuberay/rayjob-{j}.yaml" for j in RAYJOBS}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    assert (DEPLOY / "Dockerfile").is_file() and (DEPLOY / "README.md").is_file()


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_parses_to_known_objects(path):
    docs = _yaml_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        if path.parent == KUBERAY:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"
            assert doc["kind"] in ("RayCluster", "RayJob", "PersistentVolumeClaim", "ConfigMap")
        else:
            assert "cluster_name" in doc and "provider" in doc, f"{path}: not a cluster-launcher file"


# -- RayJob entrypoints -------------------------------------------------------------------------------------------
def _local(path: str) -> Path:
    """A path as the entrypoint names it inside the image -> the same file in this checkout."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path}: expected a path under {IMAGE_ROOT} (the image's copy)"
    return REPO / path[len(IMAGE_ROOT) + 1:]


@dataclass
class Entrypoint:
    job: str  # "active_train", "filter", ...
    argv: list[str]  # the job's arguments, with image paths mapped into this checkout
    conf: Path  # the --config file (every job takes one)


def _entrypoint(rayjob: dict) -> Entrypoint:
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[0] == "python", f"entrypoint must run `python jobs/X.py`: {words[:2]}"
    script = _local(words[1])
    assert script.parent == REPO / "jobs" and script.is_file(), f"{words[1]}: no such job in jobs/"
    argv = words[2:]
    assert "--config" in argv[:-1], f"{words[1]}: the entrypoint names no --config file"
    i = argv.index("--config") + 1
    argv[i] = str(_local(argv[i]))
    return Entrypoint(script.stem, argv, Path(argv[i]))


def _overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("-")]


def _job_module(name: str):
    return load_script(f"jobs/{name}.py")


def _rayjob(name: str) -> dict:
    path = KUBERAY / f"rayjob-{name}.yaml"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return _manifest(path.name)


@pytest.mark.parametrize("name", RAYJOBS)
def test_entrypoint_names_an_existing_job_and_a_conf_that_loads(name):
    ep = _entrypoint(_rayjob(name))
    assert ep.conf.parent == REPO / "conf" and ep.conf.suffix == ".yaml" and ep.conf.is_file(), ep.conf
    cfg = load_config(ep.conf, _overrides(ep.argv))  # raises ConfigError on unknown keys / bad values
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("name", RAYJOBS)
def test_entrypoint_parses_with_the_jobs_own_command_line(name):
    """The manifest's arguments go through the parser the job really uses (no Ray, no model)."""
    ep = _entrypoint(_rayjob(name))
    expected = load_config(ep.conf, _overrides(ep.argv))
    if ep.job == "active_train":
        known, cfg = _job_module("active_train").parse_args(ep.argv)
        assert cfg == expected and not known.dry_run
    elif ep.job == "filter":
        from actprm_ray.drivers.filter import parse_filter_args

        args, cfg = parse_filter_args(ep.argv)
        assert cfg == expected and args.checkpoint and args.input and args.output
    elif ep.job == "evaluate":
        assert _job_module("evaluate").parse_args(ep.argv) == expected
        assert expected.eval.scorer == "ray" and expected.eval.checkpoint and expected.eval.out
    else:
        module = _job_module(ep.job)
        parser = next((getattr(module, n) for n in ("parse_label_args", "parse_args") if hasattr(module, n)), None)
        if parser is None:
            pytest.skip(f"jobs/{ep.job}.py exposes no argument parser to check against")
        parser(ep.argv)


# -- resources against the configs ----------------------------------------------------------------------------------
@dataclass
class Pod:
    group: str
    gpus: float
    cpus: float


@dataclass
class Actor:
    role: str  # train | score | judge
    gpus: float
    cpus: float


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _container_resources(template: dict) -> tuple[float, float]:
    (container,) = template["spec"]["containers"]
    res = container["resources"]
    for key in ("cpu", "memory"):
        assert str(res["requests"][key]) == str(res["limits"][key]), f"{key}: requests != limits (QoS, Ray sizing)"
    gpus = res["limits"].get("nvidia.com/gpu", 0)
    assert str(res["requests"].get("nvidia.com/gpu", gpus)) == str(gpus), "GPU requests must equal limits"
    return _quantity(gpus), _quantity(res["limits"]["cpu"])


def _pods(cluster_spec: dict, *, at_max: bool) -> list[Pod]:
    """Worker pods at replicas (fixed clusters) or maxReplicas (autoscaling), with the resources Ray will see."""
    pods = []
    for g in cluster_spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        gpus, cpus = _container_resources(g["template"])
        cpus = _quantity(g["rayStartParams"].get("num-cpus", cpus))
        pods += [Pod(g["groupName"], gpus, cpus)] * (g["maxReplicas"] if at_max else g["replicas"])
    return pods


def _actors(job: str, cfg: Config) -> list[Actor]:
    """The GPU/CPU holders a job starts, from its config (map stages excepted: fractional CPUs only)."""
    t, p = cfg.train, cfg.pipeline
    train = [Actor("train", t.gpus_per_worker if t.use_gpu else 0.0, t.cpus_per_worker)] * t.num_workers
    score = [Actor("score", p.score_num_gpus, p.score_num_cpus)] * p.score_actors
    judge = [Actor("judge", p.label_num_gpus, p.label_num_cpus)] * p.label_actors
    return {"active_train": train + ([] if cfg.selection.inline else score) + judge, "train": train,
            "filter": score, "evaluate": score, "label": judge}[job]


def first_fit(actors: list[Actor], pods: list[Pod]) -> list[Actor]:
    """First-fit decreasing of actors onto pods by (GPU, CPU); returns the actors that did not fit. A fit here is
    sufficient, not necessary, for Ray to place them (each actor's resources must come from one node)."""
    free = [[p.gpus, p.cpus] for p in pods]
    left = []
    for a in sorted(actors, key=lambda a: (a.gpus, a.cpus), reverse=True):
        slot = next((f for f in free if f[0] >= a.gpus and f[1] >= a.cpus), None)
        if slot is None:
            left.append(a)
        else:
            slot[0] -= a.gpus
            slot[1] -= a.cpus
    return left


def test_first_fit_on_hand_worked_cases():
    eight = [Pod("gpu", 8, 16), Pod("gpu", 8, 16)]
    # 2 x 4 GPU + 8 x 1 GPU = 16 GPUs: exactly two 8-GPU pods.
    assert first_fit([Actor("judge", 4, 1)] * 2 + [Actor("train", 1, 1)] * 8, eight) == []
    # 3 x 5 GPUs cannot share 8-GPU pods: one is left although 16 >= 15 GPUs in total.
    assert first_fit([Actor("judge", 5, 1)] * 3, eight) == [Actor("judge", 5, 1)]
    # CPU is a second dimension: 17 one-CPU actors on 2 x 16 CPUs fit, 33 do not.
    assert first_fit([Actor("score", 0, 1)] * 17, eight) == []
    assert len(first_fit([Actor("score", 0, 1)] * 33, eight)) == 1


def _check_sizing(job: str, cfg: Config, pods: list[Pod], *, fixed: bool, where: str) -> None:
    actors = _actors(job, cfg)
    assert first_fit(actors, pods) == [], f"{where}: {job} actors do not fit the worker pods"
    need = {r: sum(a.gpus for a in actors if a.role == r) for r in ("train", "score", "judge")}
    have = {g: sum(p.gpus for p in pods if p.group == g) for g in {p.group for p in pods}}
    if need["train"] or need["score"]:
        assert have.get("gpu", 0) >= need["train"] + need["score"], \
            f"{where}: group gpu has {have.get('gpu', 0)} GPUs for num_workers x gpus_per_worker + scorers = " \
            f"{need['train'] + need['score']}"
    if need["judge"]:
        j = cfg.labeler.judge
        assert cfg.pipeline.label_num_gpus == j.tensor_parallel_size, \
            "each labeler actor owns one vLLM engine: label_num_gpus must equal judge.tensor_parallel_size"
        assert have.get("judge", 0) >= j.tensor_parallel_size * cfg.pipeline.label_actors, \
            f"{where}: group judge has {have.get('judge', 0)} GPUs for tensor_parallel_size x label_actors"
    if job in ("active_train", "train") and any(p.gpus for p in pods):
        assert cfg.train.use_gpu, f"{where}: a GPU cluster with train.use_gpu=false trains on CPU"
    if fixed:  # a fixed-size cluster should not pay for a whole idle node
        biggest = max(p.gpus for p in pods)
        assert sum(p.gpus for p in pods) - biggest < sum(need.values()), f"{where}: one GPU pod could go"


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_cluster_fits_its_config(name):
    job = _rayjob(name)
    ep = _entrypoint(job)
    spec = job["spec"]["rayClusterSpec"]
    assert spec.get("enableInTreeAutoscaling") is False, "RayJob clusters are sized for their job, not autoscaled"
    _check_sizing(ep.job, load_config(ep.conf, _overrides(ep.argv)), _pods(spec, at_max=False), fixed=True,
                  where=f"rayjob-{name}")


def test_raycluster_fits_its_config_at_max_replicas():
    doc = _manifest("raycluster.yaml")
    conf = REPO / doc["metadata"]["annotations"]["actprm/sized-for"]
    cfg = load_config(conf)
    pods = _pods(doc["spec"], at_max=True)
    for job in doc["metadata"]["annotations"]["actprm/jobs"].split(","):
        _check_sizing(job, cfg, pods, fixed=False, where=f"raycluster ({job})")
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 for g in doc["spec"]["workerGroupSpecs"]), "GPU groups should scale to zero"


def test_cluster_launcher_fits_its_config():
    cfg_path, job = LAUNCHER_SIZED_FOR
    launcher = _yaml_docs(DEPLOY / "cluster.yaml")[0]
    pods = []
    for name, node in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            assert node["resources"].get("CPU") == 0, "the head takes no tasks or actors"
            continue
        group = "judge" if "judge" in name else "gpu"
        pods += [Pod(group, node["resources"].get("GPU", 0), node["resources"]["CPU"])] * node["max_workers"]
    assert sum(n.get("max_workers", 0) for k, n in launcher["available_node_types"].items()
               if k != launcher["head_node_type"]) <= launcher["max_workers"]
    _check_sizing(job, load_config(REPO / cfg_path), pods, fixed=False, where="cluster.yaml")


# -- pods: environment, secrets, storage, image -----------------------------------------------------------------
def _cluster_specs() -> list[tuple[str, dict]]:
    out = [("raycluster.yaml", _manifest("raycluster.yaml")["spec"])]
    out += [(f"rayjob-{n}.yaml", _manifest(f"rayjob-{n}.yaml")["spec"]["rayClusterSpec"])
            for n in RAYJOBS if (KUBERAY / f"rayjob-{n}.yaml").is_file()]
    return out


def _templates(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"])] + [(g["groupName"], g["template"])
                                                             for g in spec["workerGroupSpecs"]]


def _expected_env() -> dict[str, str]:
    # The same variables ray_env gives a local instance, except that a cluster must allow multi-node Ray.
    return {**RAY_ENV_DEFAULTS, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def test_env_configmap_carries_ray_env_for_a_cluster():
    data = _manifest("env.yaml")["data"]
    expected = _expected_env()
    assert {k: data.get(k) for k in expected} == expected
    assert not any(re.search(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD)(_|$)", k) for k in data), "secrets belong in the Secret"


def test_every_ray_pod_takes_env_configmap_shared_volume_and_secret_refs():
    for fname, spec in _cluster_specs():
        images = set()
        for group, template in _templates(spec):
            where = f"{fname}:{group}"
            (c,) = template["spec"]["containers"]
            images.add(c["image"])
            assert {"configMapRef": {"name": CONFIGMAP}} in c.get("envFrom", []), where
            env = {e["name"]: e for e in c.get("env", [])}
            for name, key in (("HF_TOKEN", "hf-token"), ("ACTPRM_JUDGE_API_KEY", "judge-api-key")):
                assert "value" not in env[name], f"{where}: {name} must come from a Secret"
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == SECRET
                assert env[name]["valueFrom"]["secretKeyRef"]["key"] == key
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == \
                _manifest("storage.yaml")["metadata"]["name"], where
            assert volumes[mounts[SHM_MOUNT]]["emptyDir"]["medium"] == "Memory", where
        assert len(images) == 1, f"{fname}: head and workers must run one image (same Python, Ray, code)"
        assert spec["rayVersion"] == _pin("ray[default,data,train]", _pyproject()["project"]["dependencies"])[2:]


@pytest.mark.parametrize("name", RAYJOBS)
def test_the_jobs_storage_paths_suit_a_multi_node_cluster(name):
    """run.output_dir must be shared (checkpoints, published weights, the run ledger); so must the label cache, which
    is part of the ledger (label/cache.py): a retry's fresh pods would otherwise pay every label again."""
    ep = _entrypoint(_rayjob(name))
    cfg = load_config(ep.conf, _overrides(ep.argv))
    assert cfg.run.output_dir.startswith(SHARED_MOUNT + "/"), f"run.output_dir {cfg.run.output_dir}"
    if ep.job == "active_train":  # a real pool, not the embedded synthetic default
        assert cfg.data.pool.startswith(SHARED_MOUNT + "/") or "://" in cfg.data.pool, f"data.pool {cfg.data.pool!r}"
    if ep.job in ("active_train", "label") and cfg.labeler.kind != "oracle":
        path = cfg.labeler.judge.cache_path  # None: <run dir>/ledger/labels (label: <--output>/ledger/labels)
        assert path is None or path.startswith(SHARED_MOUNT + "/") or "://" in path, \
            f"labeler.judge.cache_path {path!r} must be shared storage (or null: inside the run directory)"
    for flag in ("--input", "--output", "--checkpoint"):
        if flag in ep.argv:
            value = ep.argv[ep.argv.index(flag) + 1]
            assert value.startswith(SHARED_MOUNT + "/") or "://" in value, f"{flag} {value}"
    for key in ("eval.checkpoint", "eval.out"):  # the evaluate job's paths
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        assert not value or value.startswith(SHARED_MOUNT + "/") or "://" in value, f"{key} {value}"


def _volumes_and_mounts(node, where: str):
    """Every pod spec's volumes, with the container mount paths of each, anywhere in a manifest (KubeRay nests them)."""
    if isinstance(node, dict):
        if isinstance(node.get("volumes"), list) and isinstance(node.get("containers"), list):
            mounts: dict[str, list[str]] = {}
            for c in node["containers"] + node.get("initContainers", []):
                for m in c.get("volumeMounts", []):
                    mounts.setdefault(m["name"], []).append(m["mountPath"])
            for v in node["volumes"]:
                yield where, v, mounts.get(v["name"], [])
        for k, v in node.items():
            yield from _volumes_and_mounts(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _volumes_and_mounts(v, f"{where}[{i}]")


def test_no_run_state_on_pod_local_disk():
    """A backoffLimit retry or a new cluster gets fresh pods: run state (the run ledger, its label cache) on an
    emptyDir or node-local disk would be lost and every judge label paid again. /dev/shm (memory) is Ray's."""
    seen_shm = 0
    for path in ALL_YAML:
        for n, doc in enumerate(_yaml_docs(path)):
            for where, volume, mount_paths in _volumes_and_mounts(doc, f"{path.relative_to(DEPLOY)}[{n}]"):
                assert "hostPath" not in volume, f"{where}: volume {volume['name']} is node-local disk"
                if "emptyDir" not in volume:
                    continue
                assert mount_paths == [SHM_MOUNT] and (volume["emptyDir"] or {}).get("medium") == "Memory", \
                    f"{where}: emptyDir {volume['name']} mounted at {mount_paths}: only {SHM_MOUNT} (medium: " \
                    "Memory) may be pod-local; run state belongs on the shared volume"
                seen_shm += 1
    assert seen_shm >= len(_cluster_specs()), "the walk found no /dev/shm volume: it no longer sees the pods"
    texts = [p for root in (DEPLOY, REPO / "conf") for p in sorted(root.rglob("*")) if p.is_file()]
    for path in texts:
        text = path.read_text(errors="replace")
        for needle in ("/mnt/local", ".sqlite"):
            assert needle not in text.lower(), f"{path.relative_to(REPO)} mentions {needle}: run state is shared now"
    launcher = _yaml_docs(DEPLOY / "cluster.yaml")[0]
    mounts = [o.split()[1].split(":")[0] for o in launcher["docker"]["run_options"] if o.startswith("-v ")]
    assert mounts == [SHARED_MOUNT], f"cluster.yaml mounts {mounts}: only the shared volume holds run state"


def test_no_secret_values_anywhere_in_deploy():
    pattern = re.compile(r"(HF_TOKEN|API_KEY|RAY_AUTH_TOKEN)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{8,}")
    for path in [*ALL_YAML, DEPLOY / "Dockerfile", DEPLOY / "README.md"]:
        for line in path.read_text().splitlines():
            if pattern.search(line) and "%s" not in line and "$(" not in line:
                pytest.fail(f"{path.name}: looks like a literal secret: {line.strip()}")


def test_cluster_launcher_env_matches_the_configmap_and_image():
    launcher = _yaml_docs(DEPLOY / "cluster.yaml")[0]
    opts = launcher["docker"]["run_options"]
    env = dict(o[3:].split("=", 1) for o in opts if o.startswith("-e "))
    assert env == _manifest("env.yaml")["data"], "cluster.yaml and deploy/kuberay/env.yaml must set the same env"
    images = {c["image"] for _, s in _cluster_specs() for _, t in _templates(s) for c in t["spec"]["containers"]}
    assert {launcher["docker"]["image"]} == images
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--num-cpus=0" in head and "--head" in head


# -- image pins --------------------------------------------------------------------------------------------------
def _dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)=(\S+)", text, re.M)}


def test_dockerfile_pins_equal_pyproject():
    from packaging.specifiers import SpecifierSet

    args = _dockerfile_args()
    project = _pyproject()["project"]
    deps, extras = project["dependencies"], project["optional-dependencies"]
    assert "==" + args["RAY_VERSION"] == _pin("ray[default,data,train]", deps)
    assert args["TRANSFORMERS_SPEC"] == _pin("transformers", deps)
    assert "==" + args["VLLM_VERSION"] == _pin("vllm", extras["gpu"])
    assert "==" + args["VLLM_CPU_VERSION"] == _pin("vllm-cpu", extras["cpu"])
    assert args["TORCH_VERSION"] in SpecifierSet(_pin("torch", deps)), "image torch outside pyproject's range"
    install = (REPO / "scripts" / "install.sh").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in install, "image torch != scripts/install.sh's CPU pin"
    assert args["DEVICE"] in ("gpu", "cpu") and {"CUDA_IMAGE", "CPU_IMAGE"} <= set(args)


def test_dockerfile_installs_the_project_with_the_pinned_extras():
    text = (DEPLOY / "Dockerfile").read_text()
    assert '-e ".[gpu]"' in text and '-e ".[cpu]"' in text
    for arg in ("RAY_VERSION", "TORCH_VERSION", "TRANSFORMERS_SPEC", "VLLM_VERSION", "VLLM_CPU_VERSION"):
        assert "${" + arg + "}" in text, f"ARG {arg} is declared but never used"
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text  # STACK_NOTES §2, CPU path
    for name, value in _expected_env().items():
        if name not in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE"):  # deployment choices, set by the cluster files
            assert re.search(rf"\b{name}={re.escape(value)}\b", text), f"image ENV lacks {name}={value}"


def test_dockerfile_torch_is_the_one_the_installed_vllm_cpu_requires():
    import importlib.metadata as md

    try:
        reqs = md.requires("vllm-cpu") or []
    except md.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here (GPU machine)")
    torch_pins = {r.split(";")[0].strip() for r in reqs if r.startswith("torch==")}
    assert f"torch=={_dockerfile_args()['TORCH_VERSION']}+cpu" in torch_pins


# -- schemas --------------------------------------------------------------------------------------------------------
def _k8s_validator(definition: str):
    """A strict validator for one Kubernetes definition from kubernetes-validate's bundled schemas (offline)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate for schema checks")
    import json
    from importlib.resources import files

    import jsonschema
    from referencing import Registry, Resource

    version = max(v for v in kv.utils.all_versions() if kv.utils.major_minor(v) == K8S_VERSION)
    defs = json.loads((files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
                       / "_definitions.json").read_text())
    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    return jsonschema.Draft202012Validator({"$ref": f"{defs['$id']}#/$defs/{definition}"}, registry=registry)


def test_core_kubernetes_objects_validate_strictly():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate for schema checks")
    for name in ("storage.yaml", "env.yaml"):
        kv.validate(_manifest(name), K8S_VERSION, strict=True)


def test_pod_templates_validate_strictly_against_core_v1():
    validator = _k8s_validator("io.k8s.api.core.v1.PodTemplateSpec")
    for fname, spec in _cluster_specs():
        for group, template in _templates(spec):
            errors = [e.message for e in validator.iter_errors(template)]
            assert not errors, f"{fname}:{group}: {errors[:3]}"
    # The validator is strict, not vacuous: a misspelt field fails.
    bad = copy.deepcopy(_templates(_cluster_specs()[0][1])[0][1])
    bad["spec"]["containers"][0]["volumeMount"] = []
    assert list(validator.iter_errors(bad))


# KubeRay's CRDs are not in any PyPI package found (see deploy/README.md), so the ray.io/v1 fields used here are
# checked against this list of the fields that API defines (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec,
# AutoscalerOptions, RayJobSpec); it catches misspellings, not wrong types.
KUBERAY_FIELDS = {
    "RayClusterSpec": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                       "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                       "gcsFaultToleranceOptions"},
    "HeadGroupSpec": {"serviceType", "headService", "enableIngress", "rayStartParams", "template"},
    "WorkerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                        "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"},
    "AutoscalerOptions": {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                          "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"},
}


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= KUBERAY_FIELDS["RayClusterSpec"], f"{where}: {set(spec) - KUBERAY_FIELDS['RayClusterSpec']}"
    assert set(spec.get("autoscalerOptions", {})) <= KUBERAY_FIELDS["AutoscalerOptions"], where
    assert set(spec["headGroupSpec"]) <= KUBERAY_FIELDS["HeadGroupSpec"], where
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= KUBERAY_FIELDS["WorkerGroupSpec"], f"{where}:{g.get('groupName')}"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), "rayStartParams values are strings"
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())


def test_kuberay_fields_are_ray_io_v1_fields():
    doc = _manifest("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"], "raycluster.yaml")
    for n in RAYJOBS:
        if (KUBERAY / f"rayjob-{n}.yaml").is_file():
            job = _manifest(f"rayjob-{n}.yaml")
            assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
            assert set(job["spec"]) <= KUBERAY_FIELDS["RayJobSpec"], f"rayjob-{n}: {set(job['spec'])}"
            assert job["spec"].get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
            _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], f"rayjob-{n}")


def test_cluster_launcher_file_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = _yaml_docs(DEPLOY / "cluster.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(launcher)))  # what `ray up` runs first, offline
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 2  # misspelt: must be rejected
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))


# -- docs ------------------------------------------------------------------------------------------------------------
def _gen_config_doc():
    return load_script("scripts/gen_config_doc.py")


def test_config_reference_is_current():
    gen = _gen_config_doc()
    assert (REPO / "docs" / "CONFIG.md").read_text() == gen.render(), \
        "docs/CONFIG.md is stale: run python scripts/gen_config_doc.py"


def test_config_reference_lists_every_key_of_the_real_config():
    """The parsed source and the imported dataclasses agree on the key set (sections are dataclass fields)."""
    import dataclasses

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    documented = {f.key for s in _gen_config_doc().parse_config_source(
        (REPO / "actprm_ray" / "config.py").read_text(), REPO)[0] for f in s.fields}
    assert documented == set(keys(Config()))


def test_gen_config_doc_on_a_hand_written_source(tmp_path):
    pkg = tmp_path / "actprm_ray"
    pkg.mkdir()
    (pkg / "consts.py").write_text('SEP = "<s>"\n')
    source = '''
from dataclasses import dataclass, field
from typing import Optional
from actprm_ray.consts import SEP

@dataclass
class Inner:
    mode: str = "a"  # a | b, with a "#" in the text
    limit: Optional[int] = None
    sep: str = SEP  # the separator
    extra: dict = field(default_factory=dict)  # passed as given

@dataclass
class Config:
    inner: Inner = field(default_factory=Inner)

_CHOICES = {"inner.mode": ("a", "b")}
'''
    (pkg / "config.py").write_text(source)
    gen = _gen_config_doc()
    sections, choices = gen.parse_config_source(source, tmp_path)
    assert [s.key for s in sections] == ["inner"]
    assert [(f.key, f.type, f.default, f.help) for f in sections[0].fields] == [
        ("inner.mode", "str", '"a"', 'a | b, with a "#" in the text'),
        ("inner.limit", "Optional[int]", "null", ""),
        ("inner.sep", "str", '"<s>" (SEP)', "the separator"),
        ("inner.extra", "dict", "{}", "passed as given"),
    ]
    assert choices == {"inner.mode": ("a", "b")}
    text = gen.render(pkg / "config.py")
    assert '| `inner.mode` | `str` | `"a"` | a \\| b, with a "#" in the text (one of `a`, `b`) |' in text
    assert "| `inner.limit` | `Optional[int]` | `null` |  |" in text
    # A section whose dataclass is not in the file is refused, not documented as a leaf.
    with pytest.raises(ValueError, match="Elsewhere"):
        gen.parse_config_source(source.replace("field(default_factory=Inner)", "field(default_factory=Elsewhere)"),
                                tmp_path)


def test_docs_name_only_existing_jobs_and_confs():
    texts = [DEPLOY / "README.md", REPO / "docs" / "OPERATIONS.md", DEPLOY / "cluster.yaml", *ALL_YAML]
    for path in texts:
        for ref in set(re.findall(r"\b(jobs/\w+\.py|conf/\w+\.yaml)", path.read_text())):
            if re.fullmatch(r"\w+/[A-Z]\.\w+", ref):
                continue  # a placeholder such as jobs/X.py
            assert (REPO / ref).is_file(), f"{path.relative_to(REPO)} names {ref}, which does not exist"
