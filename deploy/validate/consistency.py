"""Cross-checks of the deploy files that schema validation cannot make.

The schemas say each file is well formed; this says the files agree with each other and
with the binary: every setting a deploy file gives Colloquy is one it reads (the KEYS list
in src/config.rs), every role named exists (src/app.rs), every `serve` runs --external,
references between services, volumes, Kubernetes objects and dashboards resolve, every
Colloquy metric a dashboard queries is one the binary exports (described in
src/metrics.rs), and every knob of compose.yaml is documented in .env.example.

Usage: python consistency.py REPOSITORY_ROOT   (scripts/validate-deploy runs it)
Prints one line per problem; exits 1 if there is any.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

problems: list[str] = []


def problem(where: str, message: str) -> None:
    line = f"{where}: {message}"
    if line not in problems:
        problems.append(line)


def colloquy_keys(root: Path) -> set[str]:
    """The settings Colloquy reads: `pub const KEYS` in src/config.rs."""
    source = (root / "src/config.rs").read_text()
    block = re.search(r"pub const KEYS: &\[&str\] = &\[(.*?)\];", source, re.S)
    if not block:
        sys.exit("consistency: cannot find `pub const KEYS` in src/config.rs")
    return set(re.findall(r'"([A-Z0-9_]+)"', block.group(1)))


def colloquy_roles(root: Path) -> set[str]:
    """The roles `serve --roles` accepts: `pub enum Role` in src/app.rs."""
    source = (root / "src/app.rs").read_text()
    block = re.search(r"pub enum Role \{(.*?)\}", source, re.S)
    if not block:
        sys.exit("consistency: cannot find `pub enum Role` in src/app.rs")
    return {name.lower() for name in re.findall(r"^\s*([A-Z]\w*),", block.group(1), re.M)}


def colloquy_metrics(root: Path) -> set[str]:
    """The metrics Colloquy exports: every `describe_…!("colloquy_…"` in src/metrics.rs."""
    source = (root / "src/metrics.rs").read_text()
    names = set(re.findall(r'describe_(?:counter|gauge|histogram)!\(\s*"(colloquy_\w+)"', source))
    if not names:
        sys.exit("consistency: cannot find the metric descriptions in src/metrics.rs")
    return names


def check_serve(where: str, args: list[str], roles: set[str]) -> set[str]:
    """A `serve` command line runs --external with known roles; returns its roles."""
    if not args or args[0] != "serve":
        return set()
    if "--external" not in args:
        problem(where, "`serve` without --external (it could start an empty embedded instance)")
    if "--roles" not in args or args.index("--roles") + 1 >= len(args):
        problem(where, "`serve` without --roles (every role in one process)")
        return set()
    named = set(args[args.index("--roles") + 1].split(","))
    for role in sorted(named - roles):
        problem(where, f"unknown role {role!r} (roles: {', '.join(sorted(roles))})")
    return named & roles


def host_of(url: str) -> str | None:
    """The host of a URL, with compose's ${…} interpolations stood in for."""
    return urlsplit(re.sub(r"\$\{[^}]*\}", "x", url)).hostname


# --- compose ----------------------------------------------------------------------------


def check_compose(deploy: Path, keys: set[str], roles: set[str]) -> None:
    path = deploy / "compose.yaml"
    text = path.read_text()
    compose = yaml.safe_load(text)
    services: dict = compose.get("services", {})
    volumes = set((compose.get("volumes") or {}).keys())
    where = "deploy/compose.yaml"

    # Every variable compose interpolates is documented in .env.example; the required
    # ones (${VAR:?…}) are set there, so `cp .env.example .env` gives a stack that starts.
    example = (deploy / ".env.example").read_text()
    set_vars = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, re.M))
    mentioned = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.M))
    for name, op in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?", text):
        if name not in mentioned:
            problem(where, f"${{{name}}} is not documented in deploy/.env.example")
        elif op.endswith("?") and name not in set_vars:
            problem(where, f"${{{name}}} is required but deploy/.env.example does not set it")
    for name in sorted(set_vars):
        if name not in text and name != "COMPOSE_PROFILES":
            problem("deploy/.env.example", f"{name} is not used by deploy/compose.yaml")

    covered: set[str] = set()
    gateways: set[str] = set()
    for name, service in services.items():
        here = f"{where}: service {name}"
        depends = service.get("depends_on") or []
        for dependency in depends if isinstance(depends, list) else depends.keys():
            if dependency not in services:
                problem(here, f"depends on {dependency!r}, which is not a service")
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                if not (deploy / source).exists():
                    problem(here, f"mounts {source}, which does not exist under deploy/")
            elif source and source not in volumes:
                problem(here, f"uses volume {source!r}, which is not declared under volumes:")
        image = str(service.get("image", ""))
        if "COLLOQUY_IMAGE" not in image:
            continue
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key in sorted(set(env) - keys):
            problem(here, f"sets {key}, which Colloquy does not read (src/config.rs KEYS)")
        if "," in str(env.get("NATS_URL", "")):
            problem(here, "NATS_URL lists several servers; Colloquy connects with one URL (deploy/README.md)")
        for key in ("DATABASE_URL", "NATS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            for url in str(env.get(key, "")).split(","):
                host = host_of(url.strip()) if url.strip() else None
                if host and host not in services:
                    problem(here, f"{key} names host {host!r}, which is not a service")
        command = service.get("command") or []
        served = check_serve(here, command, roles)
        covered |= served
        if "gateway" in served:
            gateways.add(name)
    for role in sorted(roles - covered):
        problem(where, f"no service runs the {role} role")

    # nginx balances over exactly the gateway services.
    nginx = (deploy / "nginx/nginx.conf").read_text()
    upstream = set(re.findall(r"^\s*server\s+([\w.-]+):8080", nginx, re.M))
    if upstream != gateways:
        problem("deploy/nginx/nginx.conf", f"upstream {sorted(upstream)} is not the gateways {sorted(gateways)}")

    # Prometheus scrapes services that exist.
    prometheus = yaml.safe_load((deploy / "prometheus/prometheus.yml").read_text())
    scraped: set[str] = set()
    for job in prometheus.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                host = target.rsplit(":", 1)[0]
                if host != "localhost":
                    scraped.add(host)
                    if host not in services:
                        problem("deploy/prometheus/prometheus.yml", f"target {target} is not a service")
    colloquy_services = {n for n, s in services.items() if s.get("command", [None])[0] == "serve"}
    for name in sorted(colloquy_services - scraped):
        problem("deploy/prometheus/prometheus.yml", f"service {name} is not scraped")

    # The collector's pipelines use what it defines.
    collector = yaml.safe_load((deploy / "otel/collector.yaml").read_text())
    for pipeline, spec in (collector.get("service", {}).get("pipelines") or {}).items():
        for kind in ("receivers", "processors", "exporters"):
            for component in spec.get(kind, []):
                if component not in (collector.get(kind) or {}):
                    problem("deploy/otel/collector.yaml", f"pipeline {pipeline} uses undefined {kind[:-1]} {component}")


# --- Grafana ----------------------------------------------------------------------------


def check_grafana(deploy: Path, metrics: set[str]) -> None:
    uids = set()
    for path in (deploy / "grafana/provisioning/datasources").glob("*.yaml"):
        for source in yaml.safe_load(path.read_text()).get("datasources", []):
            uids.add(source.get("uid"))
    dashboards = list((deploy / "grafana/dashboards").glob("*.json"))
    if not dashboards:
        problem("deploy/grafana/dashboards", "no dashboard")
    for path in dashboards:
        where = f"deploy/grafana/dashboards/{path.name}"
        try:
            dashboard = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            problem(where, f"not JSON: {error}")
            continue

        def walk(node):
            if isinstance(node, dict):
                source = node.get("datasource")
                if isinstance(source, dict) and source.get("uid") not in uids:
                    problem(where, f"datasource uid {source.get('uid')!r} is not provisioned")
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(dashboard)
        for panel in dashboard.get("panels", []):
            for target in panel.get("targets", []):
                if not target.get("expr"):
                    problem(where, f"panel {panel.get('title')!r} has a target without a query")
                for name in re.findall(r"\bcolloquy_\w+", target.get("expr") or ""):
                    # A histogram's series: <name>_bucket, _count, _sum.
                    family = re.sub(r"_(bucket|count|sum)$", "", name)
                    if name not in metrics and family not in metrics:
                        problem(where, f"panel {panel.get('title')!r} queries {name}, which Colloquy does not export")


# --- Kubernetes ---------------------------------------------------------------------------


def check_k8s(deploy: Path, keys: set[str], roles: set[str]) -> None:
    k8s = deploy / "k8s"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    for path in sorted(k8s.glob("*.yaml")):
        if path.name != "kustomization.yaml" and path.name not in listed and not path.name.endswith(".example.yaml"):
            problem(f"deploy/k8s/{path.name}", "not in kustomization.yaml's resources (so never applied or validated)")

    def env_keys(path: Path) -> set[str]:
        return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", path.read_text(), re.M))

    generated = {}
    for generator in kustomization.get("configMapGenerator", []):
        generated[generator["name"]] = set()
        for env in generator.get("envs", []):
            generated[generator["name"]] |= env_keys(k8s / env)
    config_env = (k8s / "config.env").read_text()
    if re.search(r"^NATS_URL=.*,", config_env, re.M):
        problem("deploy/k8s/config.env", "NATS_URL lists several servers; Colloquy connects with one URL")
    for key in sorted(generated.get("colloquy-config", set()) - keys):
        problem("deploy/k8s/config.env", f"{key} is not a setting Colloquy reads (src/config.rs KEYS)")

    secrets = {}
    for document in yaml.safe_load_all((k8s / "secret.example.yaml").read_text()):
        if document and document.get("kind") == "Secret":
            secrets[document["metadata"]["name"]] = set((document.get("stringData") or {}).keys())
            for key in sorted(secrets[document["metadata"]["name"]] - keys):
                problem("deploy/k8s/secret.example.yaml", f"{key} is not a setting Colloquy reads")

    objects = []
    for name in sorted(listed):
        for document in yaml.safe_load_all((k8s / name).read_text()):
            if document:
                objects.append((name, document))
    by_kind: dict[str, dict[str, dict]] = {}
    for _, document in objects:
        by_kind.setdefault(document["kind"], {})[document["metadata"]["name"]] = document
    workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}

    covered: set[str] = set()
    for name, workload in by_kind.get("Deployment", {}).items():
        where = f"deploy/k8s: Deployment {name}"
        spec = workload["spec"]
        if not spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items():
            problem(where, "selector does not match the pod template's labels")
        for container in spec["template"]["spec"]["containers"]:
            if container["image"].split(":")[0] != "colloquy":
                continue
            covered |= check_serve(where, container.get("args", []), roles)
            for source in container.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in generated:
                    problem(where, f"reads ConfigMap {source['configMapRef']['name']}, which is not generated")
                if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                    problem(where, f"reads Secret {source['secretRef']['name']}, not in secret.example.yaml")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                got = container.get(probe, {}).get("httpGet", {}).get("path")
                if got != path:
                    problem(where, f"{probe} should GET {path} (it has {got})")
            if not container.get("resources", {}).get("requests"):
                problem(where, "no resource requests")
    for role in sorted(roles - covered):
        problem("deploy/k8s", f"no Deployment runs the {role} role")

    def selects(selector: dict) -> bool:
        return any(
            selector.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads.values()
        )

    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        target = hpa["spec"]["scaleTargetRef"]
        if target["name"] not in by_kind.get(target["kind"], {}):
            problem(f"deploy/k8s: HorizontalPodAutoscaler {name}", f"scales {target['kind']} {target['name']}, which is not defined")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not selects(pdb["spec"]["selector"]["matchLabels"]):
            problem(f"deploy/k8s: PodDisruptionBudget {name}", "selects no workload's pods")
    for name, service in by_kind.get("Service", {}).items():
        if not selects(service["spec"].get("selector", {})):
            problem(f"deploy/k8s: Service {name}", "selects no workload's pods")
    for name, ingress in by_kind.get("Ingress", {}).items():
        for rule in ingress["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"]["service"]["name"]
                if backend not in by_kind.get("Service", {}):
                    problem(f"deploy/k8s: Ingress {name}", f"routes to Service {backend}, which is not defined")
    for name, statefulset in by_kind.get("StatefulSet", {}).items():
        if statefulset["spec"].get("serviceName") not in by_kind.get("Service", {}):
            problem(f"deploy/k8s: StatefulSet {name}", "its serviceName is not a defined Service")


def main() -> int:
    root = Path(sys.argv[1]).resolve()
    deploy = root / "deploy"
    keys, roles = colloquy_keys(root), colloquy_roles(root)
    check_compose(deploy, keys, roles)
    check_grafana(deploy, colloquy_metrics(root))
    check_k8s(deploy, keys, roles)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s)")
        return 1
    print(f"deploy files agree with each other and with the binary ({len(keys)} settings, roles {', '.join(sorted(roles))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
