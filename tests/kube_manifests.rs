//! The Kubernetes manifests (deploy/kubernetes) against the proxy itself: every overlay
//! is rendered with `kubectl kustomize`, and what the pods are told — the command,
//! ports, probe paths, mounted files, the ConfigMap's config.toml, the drain time —
//! must agree with what `xks-proxy serve` reads and serves. The AWS overlay's pod is
//! then laid out under a temporary root (each volume as the kubelet lays it out, the
//! Secrets holding a quickstart's certificate, SigV4 secret and PIN), checked with
//! `xks-proxy check-config`, and started: the probes answer on the paths and port the
//! Deployment names, and the API accepts the mounted credential.
//!
//! Without kubectl the test says so and passes, unless XKS_REQUIRE_KUBECTL is set, as
//! scripts/check-kube.sh sets it after installing kubectl.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use common::*;
use yaml_rust2::{Yaml, YamlLoader};

const KUBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// `kubectl kustomize DIR`, parsed; `None` when kubectl is missing.
fn render(dir: &Path) -> Option<Vec<Yaml>> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("XKS_REQUIRE_KUBECTL").is_none(),
                "kubectl is required (XKS_REQUIRE_KUBECTL is set) but not installed"
            );
            eprintln!("SKIPPED: kubectl is not installed; scripts/check-kube.sh installs it and runs this test");
            return None;
        }
        Err(e) => panic!("kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = YamlLoader::load_from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    Some(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The rendered object of `kind` named `name` (a generated ConfigMap's name has a hash
/// appended, the Deployment names it in full).
fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn has(docs: &[Yaml], kind: &str) -> bool {
    docs.iter().any(|d| d["kind"].as_str() == Some(kind))
}

fn str_list(y: &Yaml) -> Vec<&str> {
    y.as_vec()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// The proxy container and its named ports.
fn proxy_container(deployment: &Yaml) -> (&Yaml, BTreeMap<&str, i64>) {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .unwrap();
    let container = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("xks-proxy"))
        .unwrap();
    let ports = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    (container, ports)
}

/// The probes: each an HTTP GET on the admin port, readiness on /readyz, liveness and
/// start-up on /livez (which answers once the HSM is initialized).
fn check_probes(container: &Yaml, ports: &BTreeMap<&str, i64>) -> BTreeMap<&'static str, String> {
    let mut paths = BTreeMap::new();
    for (probe, want) in [
        ("startupProbe", "/livez"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
    ] {
        let get = &container[probe]["httpGet"];
        let port = match &get["port"] {
            Yaml::String(name) => ports[name.as_str()],
            Yaml::Integer(n) => *n,
            other => panic!("{probe}: port {other:?}"),
        };
        assert_eq!(port, ports["admin"], "{probe} is not on the admin port");
        assert_eq!(get["path"].as_str(), Some(want), "{probe}");
        paths.insert(probe, want.to_owned());
    }
    paths
}

fn port_of(address: &str) -> i64 {
    address.parse::<SocketAddr>().unwrap().port().into()
}

/// A volume's files as the rendered objects give them: a ConfigMap's `data`, a
/// Secret's decoded `data`.
fn volume_files(docs: &[Yaml], volume: &Yaml) -> Option<Vec<(String, Vec<u8>)>> {
    let (kind, name, encoded) = if !volume["configMap"].is_badvalue() {
        (
            "ConfigMap",
            volume["configMap"]["name"].as_str().unwrap(),
            false,
        )
    } else if !volume["secret"].is_badvalue() {
        (
            "Secret",
            volume["secret"]["secretName"].as_str().unwrap(),
            true,
        )
    } else {
        return None;
    };
    let data = object(docs, kind, name)["data"].as_hash().unwrap();
    Some(
        data.iter()
            .map(|(k, v)| {
                let v = v.as_str().unwrap();
                let bytes = if encoded {
                    // Long values may come wrapped over several lines.
                    let v: String = v.split_whitespace().collect();
                    base64::engine::general_purpose::STANDARD.decode(v).unwrap()
                } else {
                    v.as_bytes().to_vec()
                };
                (k.as_str().unwrap().to_owned(), bytes)
            })
            .collect(),
    )
}

/// Checks every overlay's pod against the proxy; lays out and starts the AWS one.
#[tokio::test]
async fn the_manifests_agree_with_the_proxy() {
    // A copy of deploy/kubernetes whose overlays/aws/secrets/ holds a quickstart's
    // certificate, key, SigV4 secret and PIN, as an operator puts their own there.
    let setup = Setup::new();
    let tree = setup.path("kubernetes");
    copy_tree(Path::new(KUBE), &tree);
    for (from, to) in [
        ("server.pem", "tls.crt"),
        ("server-key.pem", "tls.key"),
        ("sigv4-secret", "secret-access-key"),
        ("hsm-pin", "pin"),
    ] {
        std::fs::copy(setup.path(from), tree.join("overlays/aws/secrets").join(to)).unwrap();
    }
    let Some(base) = render(&tree.join("base")) else {
        return;
    };
    let aws = render(&tree.join("overlays/aws")).unwrap();
    let demo = render(&tree.join("overlays/softhsm-demo")).unwrap();

    // The base has every production object; the demo does without those it must not
    // have (an autoscaler would add pods with tokens of their own).
    for kind in [
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "NetworkPolicy",
    ] {
        assert!(has(&base, kind) && has(&aws, kind), "{kind}");
    }
    for kind in [
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "NetworkPolicy",
        "Secret",
    ] {
        assert!(!has(&demo, kind), "the demo has a {kind}");
    }

    // --- The AWS overlay, statically.
    let deployment = object(&aws, "Deployment", "xks-proxy");
    let (container, ports) = proxy_container(deployment);
    let image = container["image"].as_str().unwrap();
    assert_eq!(
        image,
        format!("localhost/xks-proxy:{}", env!("CARGO_PKG_VERSION")),
        "the image tag follows the crate's version"
    );
    let args = str_list(&container["args"]);
    assert_eq!(&args[..2], ["serve", "--config"]);
    let config_path = Path::new(args[2]);
    let paths = check_probes(container, &ports);
    let replicas = deployment["spec"]["replicas"].as_i64().unwrap();
    assert!(replicas >= 2);

    let mounts = container["volumeMounts"].as_vec().unwrap();
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_vec()
        .unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    // The configuration file is in the ConfigMap's volume.
    let config_mount = mounts
        .iter()
        .find(|m| config_path.parent() == Some(Path::new(m["mountPath"].as_str().unwrap())))
        .expect("the --config file's folder is a mount");
    let config_volume = volume(config_mount["name"].as_str().unwrap());
    assert!(config_volume["configMap"]["name"]
        .as_str()
        .unwrap()
        .starts_with("xks-proxy-config"));
    let files = volume_files(&aws, config_volume).expect("--config is in a ConfigMap");
    let config_text = files
        .iter()
        .find(|(name, _)| Path::new(name) == config_path.file_name().unwrap())
        .map(|(_, text)| String::from_utf8(text.clone()).unwrap())
        .expect("the ConfigMap holds the --config file");
    let config: toml::Table = toml::from_str(&config_text).unwrap();
    let server = &config["server"];
    assert_eq!(port_of(server["listen"].as_str().unwrap()), ports["api"]);
    assert_eq!(
        port_of(config["admin"]["listen"].as_str().unwrap()),
        ports["admin"]
    );
    assert_eq!(
        config["proxy"]["fleet_size"].as_integer(),
        Some(replicas),
        "proxy.fleet_size is the replica count"
    );
    // The drain: the preStop pause, then the proxy's own grace, then a margin.
    let grace = server["shutdown_grace_seconds"].as_integer().unwrap();
    let pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap();
    let termination = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert!(
        termination > pause + grace,
        "terminationGracePeriodSeconds {termination} leaves no margin after preStop {pause} s + shutdown_grace_seconds {grace}"
    );

    // Services, ServiceMonitor and NetworkPolicy name ports the pod has.
    let api = object(&aws, "Service", "xks-proxy");
    assert_eq!(api["spec"]["type"].as_str(), Some("LoadBalancer"));
    let api_ports = api["spec"]["ports"].as_vec().unwrap();
    assert_eq!(
        api_ports.len(),
        1,
        "only the API is behind the load balancer"
    );
    assert_eq!(api_ports[0]["port"].as_i64(), Some(443));
    assert_eq!(api_ports[0]["targetPort"].as_str(), Some("api"));
    let annotations = api["metadata"]["annotations"].as_hash().unwrap();
    let annotation = |k: &str| annotations[&Yaml::String(k.to_owned())].as_str().unwrap();
    assert_eq!(
        annotation("service.beta.kubernetes.io/aws-load-balancer-type"),
        "external"
    );
    assert_eq!(
        annotation("service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"),
        "ip"
    );
    assert_eq!(
        annotation("service.beta.kubernetes.io/aws-load-balancer-scheme"),
        "internal"
    );
    assert_eq!(
        annotation("service.beta.kubernetes.io/aws-load-balancer-healthcheck-path"),
        paths["readinessProbe"]
    );
    let metrics = object(&aws, "Service", "xks-proxy-metrics");
    let metrics_port = &metrics["spec"]["ports"][0];
    assert_eq!(metrics_port["targetPort"].as_str(), Some("admin"));
    let monitor = object(&aws, "ServiceMonitor", "xks-proxy");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"].as_str(), metrics_port["name"].as_str());
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_hash()
        .unwrap()
    {
        assert_eq!(
            &metrics["metadata"]["labels"][k.as_str().unwrap()],
            v,
            "ServiceMonitor selector"
        );
    }
    let policy = object(&aws, "NetworkPolicy", "xks-proxy");
    let mut allowed: Vec<&str> = policy["spec"]["ingress"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_vec().unwrap())
        .map(|p| p["port"].as_str().unwrap())
        .collect();
    allowed.sort_unstable();
    assert_eq!(allowed, ["admin", "api"]);

    // --- The AWS pod laid out under a temporary root, each volume as the kubelet
    // lays it out. Paths in config.toml are absolute: each mount point's prefix gets
    // the root in front; a path outside every mount stays as it is and fails.
    let root = setup.path("root");
    let under_root = |p: &str| root.join(p.trim_start_matches('/'));
    let mut rooted = config_text.clone();
    for mount in mounts {
        let path = mount["mountPath"].as_str().unwrap();
        // A marker first: the root itself may lie under a mount point (/tmp).
        rooted = rooted.replace(&format!("\"{path}/"), &format!("\"\u{0}{path}/"));
    }
    let rooted = rooted.replace('\u{0}', root.to_str().unwrap());
    for mount in mounts {
        let name = mount["name"].as_str().unwrap();
        let dir = under_root(mount["mountPath"].as_str().unwrap());
        let volume = volume(name);
        match volume_files(&aws, volume) {
            Some(mut files) => {
                if std::ptr::eq(volume, config_volume) {
                    for (file, text) in &mut files {
                        if Path::new(file) == config_path.file_name().unwrap() {
                            *text = rooted.clone().into_bytes();
                        }
                    }
                }
                let files: Vec<(&str, &[u8])> = files
                    .iter()
                    .map(|(n, c)| (n.as_str(), c.as_slice()))
                    .collect();
                KubeletVolume::new(&dir, &files);
            }
            None => {
                assert!(
                    !volume["emptyDir"].is_badvalue(),
                    "volume {name}: only ConfigMaps, Secrets and emptyDirs are expected"
                );
                std::fs::create_dir_all(&dir).unwrap();
            }
        }
    }
    // The init container's part: the vendor's module into its volume (here SoftHSM2).
    let module = under_root(config["hsm"]["module"].as_str().unwrap());
    assert!(
        module.starts_with(root.join("opt/pkcs11")),
        "hsm.module is not in the pkcs11-module volume: {}",
        module.display()
    );
    std::fs::create_dir_all(module.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(xks_proxy::quickstart::find_softhsm2().unwrap(), &module).unwrap();

    let mounted_config = under_root(args[2]);
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&mounted_config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config on the mounted files: {}{said}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Vec<PathBuf> = said
        .lines()
        .filter_map(|l| l.strip_prefix("reads "))
        .map(PathBuf::from)
        .collect();
    for expected in [
        "tls/tls.crt",
        "tls/tls.key",
        "sigv4/secret-access-key",
        "hsm/pin",
    ] {
        assert!(
            read.iter().any(|p| p.ends_with(expected)),
            "{expected} not read: {said}"
        );
    }
    for file in &read {
        assert!(
            file.starts_with(&root),
            "{} is outside the pod's mounts",
            file.display()
        );
    }

    // Started: only what belongs to this machine changes — the listen addresses (port
    // 0), and the token (the quickstart's, found through its SOFTHSM2_CONF).
    let mut local = rooted
        .replace(server["listen"].as_str().unwrap(), "127.0.0.1:0")
        .replace(config["admin"]["listen"].as_str().unwrap(), "127.0.0.1:0")
        .replace(
            &format!(
                "token_label = {:?}",
                config["hsm"]["token_label"].as_str().unwrap()
            ),
            &format!("token_label = {:?}", xks_proxy::quickstart::TOKEN_LABEL),
        );
    local = local.replace(
        "[hsm.environment]\n",
        &format!(
            "[hsm.environment]\nSOFTHSM2_CONF = {:?}\n",
            setup.path("softhsm2.conf").display().to_string()
        ),
    );
    std::fs::write(setup.config(), local).unwrap();
    let key_store = &config["key_store"].as_array().unwrap()[0];
    let access_key_id = key_store["credential"].as_array().unwrap()[0]["access_key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        format!("/{}/kms/xks/v1", key_store["uri_prefix"].as_str().unwrap()),
        PREFIX
    );
    let proxy = setup.start();
    for path in paths.values() {
        let (status, body) = proxy.admin_get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let mut client = proxy.client();
    client.signing.access_key_id = access_key_id;
    let health = client
        .post(
            Version::Http1,
            &health_path(),
            &serde_json::json!({ "requestMetadata": metadata() }),
        )
        .await;
    assert_eq!(health.status, 200, "{:?}", health.body);

    // --- The demo: the quickstart in the pod, its API on the "api" port, its admin
    // listener (the quickstart's: the next port) on the "admin" port.
    let deployment = object(&demo, "Deployment", "xks-proxy");
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(1));
    let (container, ports) = proxy_container(deployment);
    assert_eq!(
        container["image"].as_str(),
        Some("localhost/xks-proxy-demo:latest")
    );
    let args = str_list(&container["args"]);
    assert_eq!(args[0], "quickstart");
    let listen: SocketAddr = args[args.iter().position(|a| *a == "--listen").unwrap() + 1]
        .parse()
        .unwrap();
    assert_eq!(i64::from(listen.port()), ports["api"]);
    assert_eq!(
        i64::from(xks_proxy::quickstart::admin_listen(listen).port()),
        ports["admin"]
    );
    check_probes(container, &ports);
    let dir = args[args.iter().position(|a| *a == "--dir").unwrap() + 1];
    assert!(
        container["volumeMounts"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"].as_str() == Some(dir)),
        "the quickstart's --dir is not a volume (the root filesystem is read-only)"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
