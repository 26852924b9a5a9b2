//! The generator's Kubernetes Job (deploy/loadtest) against the generator itself: the
//! example overlay is rendered with `kubectl kustomize` (its local/ files holding a
//! test proxy's SigV4 secret and CA and a start time), and the rendered pod is run
//! here, once per index, as the kubelet would run it: each volume laid out under a
//! temporary root from the rendered ConfigMaps and Secrets, the environment from the
//! rendered settings, the args' `$(VAR)`s expanded, the container's command (the
//! mounted job.sh) started with JOB_COMPLETION_INDEX set. So the args parse as
//! `xks-loadtest run` reads them, the mounted file names are the ones the args and the
//! script name, and the reports and their merge land where docs/capacity.md says.
//! Only what must differ on one machine is replaced, and each replaced setting must
//! exist in the manifests: the target's values (the test proxy's), the load's size
//! (a short run), the metrics address (port 0: three processes share the machine) and
//! the metrics hold (none).
//!
//! Without kubectl the test says so and passes, unless XKS_REQUIRE_KUBECTL is set, as
//! scripts/check-loadtest-kube.sh sets it.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{Proxy, ACCESS_KEY_ID, BIN, PREFIX};
use xks_loadtest::report::Report;
use yaml_rust2::{Yaml, YamlLoader};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/loadtest");

/// `kubectl kustomize DIR`, parsed; `None` when kubectl is missing.
fn render(dir: &Path) -> Option<Vec<Yaml>> {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("XKS_REQUIRE_KUBECTL").is_none(),
                "kubectl is required (XKS_REQUIRE_KUBECTL is set) but not installed"
            );
            eprintln!("SKIPPED: kubectl is not installed; scripts/check-loadtest-kube.sh installs it and runs this test");
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

fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// A ConfigMap's `data`, or a Secret's decoded `data`.
fn data(docs: &[Yaml], kind: &str, name: &str) -> BTreeMap<String, Vec<u8>> {
    object(docs, kind, name)["data"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let v = v.as_str().unwrap();
            let bytes = if kind == "Secret" {
                let v: String = v.split_whitespace().collect();
                base64::engine::general_purpose::STANDARD.decode(v).unwrap()
            } else {
                v.as_bytes().to_vec()
            };
            (k.as_str().unwrap().to_owned(), bytes)
        })
        .collect()
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

/// `$(VAR)` expanded from `env`, as the kubelet does in args; an unknown name fails
/// the test (the kubelet would pass it on verbatim, and the run would fail on it).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find("$(") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find(')').unwrap() + at;
        let name = &rest[at + 2..end];
        out.push_str(
            env.get(name)
                .unwrap_or_else(|| panic!("{arg}: $({name}) is not in the pod's environment")),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The container's pod, laid out under a root; what it runs.
struct Pod {
    command: Vec<String>,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

#[test]
fn the_job_runs_its_generators_and_merges_their_reports() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_dir = dir.path().join("proxy");
    std::fs::create_dir(&proxy_dir).unwrap();
    let proxy = Proxy::software(&proxy_dir);

    // The overlay's local/ files, as docs/capacity.md has an operator write them.
    let tree = dir.path().join("loadtest");
    copy_tree(Path::new(DEPLOY), &tree);
    let local = tree.join("overlays/example/local");
    std::fs::copy(
        proxy_dir.join("sigv4-secret"),
        local.join("secret-access-key"),
    )
    .unwrap();
    std::fs::copy(proxy_dir.join("ca.pem"), local.join("ca.pem")).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Time for three processes to start and connect on a loaded machine.
    let start_at = (now + 10).to_string();
    std::fs::write(local.join("start-at"), format!("{start_at}\n")).unwrap();

    let Some(base) = render(&tree.join("base")) else {
        return;
    };
    let docs = render(&tree.join("overlays/example")).unwrap();

    // The Job: indexed, all at once, no retries; GENERATORS says the same number.
    let job = object(&docs, "Job", "xks-loadtest");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let parallelism = spec["parallelism"].as_i64().unwrap();
    assert_eq!(spec["completions"].as_i64(), Some(parallelism));
    assert_eq!(spec["backoffLimit"].as_i64(), Some(0));
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"].as_str(), Some("Never"));
    let containers = pod["containers"].as_vec().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // Its environment: envFrom's ConfigMaps, then env (which wins, as in the kubelet).
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_vec().unwrap() {
        let name = from["configMapRef"]["name"].as_str().unwrap();
        for (k, v) in data(&docs, "ConfigMap", name) {
            env.insert(k, String::from_utf8(v).unwrap());
        }
    }
    for var in container["env"].as_vec().unwrap() {
        env.insert(
            var["name"].as_str().unwrap().to_owned(),
            var["value"].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(
        env["GENERATORS"].parse::<i64>().unwrap(),
        parallelism,
        "GENERATORS and the Job's parallelism differ: index 0 would wait for the wrong number of reports"
    );
    let generators = usize::try_from(parallelism).unwrap();

    // The metrics port: the one the args listen on, named for the PodMonitor, whose
    // selector matches the pods.
    let ports = container["ports"].as_vec().unwrap();
    let metrics_port = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .unwrap()["containerPort"]
        .as_i64()
        .unwrap();
    let raw_args: Vec<&str> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        raw_args.contains(&format!("--metrics-listen=0.0.0.0:{metrics_port}").as_str()),
        "{raw_args:?}"
    );
    let monitor = object(&docs, "PodMonitor", "xks-loadtest");
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["port"].as_str(),
        Some("metrics")
    );
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_hash()
        .unwrap()
    {
        assert_eq!(
            &spec["template"]["metadata"]["labels"][k.as_str().unwrap()],
            v
        );
    }

    // The volumes, laid out under root as the kubelet mounts them.
    let root = dir.path().join("root");
    let volumes = pod["volumes"].as_vec().unwrap();
    let mut mounts: Vec<String> = Vec::new();
    for mount in container["volumeMounts"].as_vec().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let path = mount["mountPath"].as_str().unwrap();
        let at = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&at).unwrap();
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        let files = if let Some(map) = volume["configMap"]["name"].as_str() {
            data(&docs, "ConfigMap", map)
        } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
            data(&docs, "Secret", secret)
        } else {
            let claim = volume["persistentVolumeClaim"]["claimName"]
                .as_str()
                .unwrap();
            let pvc = object(&docs, "PersistentVolumeClaim", claim);
            assert!(pvc["spec"]["accessModes"]
                .as_vec()
                .unwrap()
                .contains(&Yaml::String("ReadWriteMany".into())));
            BTreeMap::new()
        };
        for (file, bytes) in files {
            std::fs::write(at.join(file), bytes).unwrap();
        }
        mounts.push(path.to_owned());
    }
    // Longest first, so that a mount inside another is rewritten as itself.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let rooted = |value: &str| -> String {
        for mount in &mounts {
            if value == mount || value.starts_with(&format!("{mount}/")) {
                return format!("{}{value}", root.display());
            }
        }
        value.to_owned()
    };

    // What must differ on one machine; each must be a setting the manifests have.
    let endpoint = format!("https://localhost:{}", proxy.addr.port());
    for (key, value) in [
        ("ENDPOINT", endpoint.as_str()),
        ("URI_PREFIX", PREFIX),
        ("ACCESS_KEY_ID", ACCESS_KEY_ID),
        ("KEY_ID", "foo"),
        ("REGION", "us-east-1"),
        ("RATE", "100"),
        ("DURATION", "1.5"),
        ("WARMUP", "0.2"),
        ("CONNECTIONS", "2"),
        ("MERGE_WAIT", "120"),
    ] {
        assert!(env.contains_key(key), "the settings have no {key}");
        env.insert(key.to_owned(), value.to_owned());
    }
    for value in env.values_mut() {
        *value = rooted(value);
    }
    let args: Vec<String> = raw_args
        .iter()
        .map(|arg| {
            let arg = expand(arg, &env);
            match arg.split_once('=') {
                Some(("--metrics-listen", _)) => "--metrics-listen=127.0.0.1:0".to_owned(),
                Some(("--metrics-hold", _)) => "--metrics-hold=0".to_owned(),
                Some((flag, value)) => format!("{flag}={}", rooted(value)),
                None => arg,
            }
        })
        .collect();
    let command: Vec<String> = container["command"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|c| rooted(c.as_str().unwrap()))
        .collect();
    // Every mounted file the pod names exists where it is mounted.
    for value in args
        .iter()
        .filter_map(|a| a.split_once('=').map(|(_, v)| v))
        .chain(env.values().map(String::as_str))
        .chain(command.iter().map(String::as_str))
    {
        if value.starts_with(&root.display().to_string()) {
            assert!(Path::new(value).exists(), "{value} is not mounted");
        }
    }
    let pod = Pod { command, args, env };

    // The pod with the base's empty start time stops before it sends anything.
    let base_start = data(&base, "ConfigMap", "xks-loadtest-start");
    assert_eq!(base_start["start-at"], b"");
    let empty = dir.path().join("empty-start-at");
    std::fs::write(&empty, "").unwrap();
    let out = run(&pod, 0, Some(&empty)).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no start time"));

    // The generators, all at once, as the Job starts them.
    let running: Vec<_> = (0..generators)
        .map(|index| (index, run(&pod, index, None).spawn().unwrap()))
        .collect();
    for (index, child) in running {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "generator {index} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The reports on the shared volume, by index, and index 0's merge of them.
    let run_dir = PathBuf::from(&pod.env["REPORTS"]).join(&start_at);
    let reports: Vec<Report> = (0..generators)
        .map(|i| Report::read(&run_dir.join(format!("generator-{i}.json"))).unwrap())
        .collect();
    let merged = Report::read(&run_dir.join("merged.json")).unwrap();
    assert_eq!(merged.kind, "merged");
    assert_eq!(merged.machines.len(), generators);
    assert_eq!(
        merged.summary.requests,
        reports.iter().map(|r| r.summary.requests).sum::<u64>()
    );
    for report in &reports {
        assert!(report.summary.requests > 0);
        assert_eq!(report.summary.errors, 0, "{:?}", report.error_counts);
        assert_eq!(
            report.config["start_at_unix"],
            start_at.parse::<f64>().unwrap()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The pod's command for `index`, with `xks-loadtest` on the PATH as in the image (and
/// another start-at file when given).
fn run(pod: &Pod, index: usize, start_at_file: Option<&Path>) -> Command {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new(&pod.command[0]);
    command
        .args(&pod.command[1..])
        .args(&pod.args)
        .env_clear()
        .envs(&pod.env)
        .env("PATH", path)
        .env("JOB_COMPLETION_INDEX", index.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(file) = start_at_file {
        command.env("START_AT_FILE", file);
    }
    command
}
