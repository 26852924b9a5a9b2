//! The `xks-proxy` command: thin. Parses the command line, loads the configuration and
//! calls into the library.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use xks_proxy::affinity;
use xks_proxy::config::Config;
use xks_proxy::hsm::pkcs11::{self, KeyAction, NewKeyUsage};
use xks_proxy::hsm::Backend;
use xks_proxy::logging::LogWriter;
use xks_proxy::metrics::Metrics;
use xks_proxy::quickstart;
use xks_proxy::server::{self, Server};

/// The process's allocator, the PKCS#11 module's included: mimalloc, built with its
/// `override` feature, which defines `malloc`, `free` and the rest in this executable.
/// glibc refers to those names, so the linker exports them from the executable, and the
/// module, loaded later with `dlopen`, binds its allocations (and OpenSSL's and the C++
/// runtime's under it) to them (`tests/cli.rs` checks every binding). On SoftHSM2 this
/// took a tenth off the CPU per Encrypt, most of it glibc's `malloc` and `free` on the
/// session threads and arena-lock hand-offs between them and the tokio workers
/// (perf/steps.md, "A faster box, and one allocator for the whole process"). Replacing only Rust's allocator did not show.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "AWS KMS External Key Store (XKS) proxy for PKCS#11 HSMs"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "XKS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the XKS API.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration as `serve` reads it: the file, the certificate and key, the
    /// secret and PIN files, the policies and the module's path; the HSM is not opened
    /// and nothing listens. Prints the addresses and the files it read.
    CheckConfig {
        /// Configuration file (TOML).
        config: PathBuf,
    },
    /// Manage keys on the configured PKCS#11 token.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Examine a PKCS#11 module before configuring it (docs/hsm-onboarding.md).
    Hsm {
        #[command(subcommand)]
        action: HsmCommand,
    },
    /// SigV4 credentials for key stores.
    Credentials {
        #[command(subcommand)]
        action: CredentialsCommand,
    },
    /// Set up a local soft token (SoftHSM2, kryoptic), keys, credentials, certificates and
    /// config, then serve.
    Quickstart {
        /// Folder for everything the quickstart creates (reused when run again).
        #[arg(long, default_value = "./xks-quickstart")]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// PKCS#11 module (default: SoftHSM2 from the usual places; kryoptic's
        /// libkryoptic_pkcs11.so or any module whose token C_InitToken can initialize).
        #[arg(long)]
        module: Option<PathBuf>,
        /// Prepare the folder and exit without serving.
        #[arg(long)]
        setup_only: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HsmCommand {
    /// What the module offers XKS: library, token, session limits, mechanisms, the GCM
    /// IV convention, session key copies, a short latency sample, and the `[hsm]`
    /// section that fits. Read-only: one temporary session key, destroyed afterwards.
    /// Exits 1 when the module cannot serve XKS, with the reasons.
    Probe {
        /// PKCS#11 module (.so).
        #[arg(long, required_unless_present = "config")]
        module: Option<PathBuf>,
        /// Token label (default: the module's only initialized token).
        #[arg(long, conflicts_with = "token_serial")]
        token_label: Option<String>,
        /// Token serial number.
        #[arg(long)]
        token_serial: Option<String>,
        /// File holding the user PIN (trailing newline ignored).
        #[arg(long)]
        pin_file: Option<PathBuf>,
        /// Take module, token, PIN and [hsm.environment] from this configuration (its
        /// first EKM), and compare its [hsm] settings with the recommendation. Flags
        /// override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A token key (CKA_LABEL) to time against its session copy (default: the
        /// first AES key on the token). Only read, never changed.
        #[arg(long)]
        key_label: Option<String>,
        /// Session counts to sample, e.g. 1,2,4,8 (0: no sample).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        sessions: Vec<usize>,
        /// Seconds measured per session count.
        #[arg(long, default_value_t = 1.0)]
        sample_seconds: f64,
        /// Also log in with an empty and a wrong PIN to show what the module answers.
        /// Off by default: HSMs lock a partition after a few failed logins.
        #[arg(long)]
        try_wrong_pin: bool,
        /// The report as JSON (schema in docs/hsm-onboarding.md).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialsCommand {
    /// Print a fresh spec-conformant credential, the lines to add to the key store's
    /// configuration, and the KMS console JSON. Rotation: add it next to the old one,
    /// reload (SIGHUP), update the key store in KMS, then remove the old one.
    New {
        /// The key store's URI path prefix (as in the configuration; may be empty).
        #[arg(long, default_value = "")]
        uri_prefix: String,
        /// Write the secret to this file (mode 0600) instead of printing it inline in
        /// the configuration lines.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create an AES-256 key (sensitive, non-extractable) labelled with the external key id.
    Create {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// External key id (becomes CKA_LABEL).
        id: String,
        /// Allow ENCRYPT only.
        #[arg(long, conflicts_with_all = ["decrypt_only", "no_usage"])]
        encrypt_only: bool,
        /// Allow DECRYPT only.
        #[arg(long, conflicts_with = "no_usage")]
        decrypt_only: bool,
        /// Allow neither (for testing InvalidKeyUsageException).
        #[arg(long)]
        no_usage: bool,
    },
    /// List the token's secret keys with their metadata.
    List {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Disable a key (creates its disabled marker): GetKeyMetadata reports DISABLED and
    /// Encrypt/Decrypt answer InvalidStateException.
    Disable {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// External key id.
        id: String,
    },
    /// Enable a key (removes its disabled marker).
    Enable {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// External key id.
        id: String,
    },
    /// Rotate a key: create a new version with the same usages and make it current.
    /// Encrypt uses it (and says so in ciphertextMetadata) once the proxy notices,
    /// within `key_refresh_seconds`; ciphertexts of every older version still decrypt.
    Rotate {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// External key id.
        id: String,
    },
    /// Destroy a key's material on the token. Irreversible: every ciphertext made under
    /// it becomes undecryptable.
    Destroy {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// External key id.
        id: String,
        /// Required: confirms that the key material is to be destroyed.
        #[arg(long, required = true)]
        confirm_destroy: bool,
    },
}

type Error = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve { config } => serve(&config, logs.as_ref()),
        Command::CheckConfig { config } => check_config(&config),
        Command::Keys { action } => keys(action),
        Command::Hsm { action } => hsm(action),
        Command::Credentials { action } => credentials(action),
        Command::Quickstart {
            dir,
            listen,
            module,
            setup_only,
        } => run_quickstart(&dir, listen, module.as_deref(), setup_only, logs.as_ref()),
    };
    if let Some(logs) = logs {
        logs.close();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr through a [`LogWriter`], which writes them from a thread of its
/// own (see `xks_proxy::logging`); a panic flushes them before its message.
fn init_logging(format: LogFormat) -> Option<LogWriter> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes unless a person is watching: escape sequences cost formatting
    // time on every audit line and clutter log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let writer = match LogWriter::start(std::io::stderr()) {
        Ok(writer) => writer,
        Err(e) => {
            // Unlikely (no thread could start); log the old way, one write per line.
            eprintln!("warning: logging without a writer thread: {e}");
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi)
                .with_writer(std::io::stderr);
            match format {
                LogFormat::Text => builder.init(),
                LogFormat::Json => builder.json().flatten_event(true).init(),
            }
            return None;
        }
    };
    match format {
        // The same lines as the default text format, written without most of its
        // `core::fmt` work (xks_proxy::logging::TextFormat).
        LogFormat::Text if !ansi => {
            let subscriber = xks_proxy::logging::text_subscriber(filter, writer.clone());
            tracing_subscriber::util::SubscriberInitExt::init(subscriber);
        }
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(true)
            .with_writer(writer.clone())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(writer.clone())
            .json()
            .flatten_event(true)
            .init(),
    }
    let on_panic = writer.clone();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        on_panic.flush_within(Some(std::time::Duration::from_secs(1)));
        report(info);
    }));
    Some(writer)
}

/// The process's CPU plan for `server.pin_threads`, or `None` (with a warning) where
/// the system does not say which CPUs the process may use.
fn pinning_plan() -> Option<&'static affinity::Plan> {
    let Some(plan) = affinity::Plan::from_allowed_cpus() else {
        tracing::warn!(
            "server.pin_threads: cannot read this process's CPUs; threads stay unpinned"
        );
        return None;
    };
    let plan = plan.install();
    tracing::info!(cpus = ?plan.cpus(), "pinning one tokio worker to each CPU and the HSM session threads across them");
    Some(plan)
}

/// Sets the module's environment (e.g. SOFTHSM2_CONF). Called before the runtime and
/// the session threads start: the only other thread then is the log writer, which
/// never reads the environment.
fn apply_environment(environment: &BTreeMap<String, String>) {
    for (name, value) in environment {
        std::env::set_var(name, value);
    }
}

fn serve(config_path: &Path, logs: Option<&LogWriter>) -> Result<(), Error> {
    let config = Config::load(config_path)?;
    if let Some(logs) = logs {
        // The server refuses new work while this writer is congested.
        logs.set_limit(config.log_buffer_bytes);
        logs.register();
    }
    apply_environment(&config.environment);
    // Before the backend starts its session threads, which take their CPUs from it.
    let pinning = config.pin_threads.then(pinning_plan).flatten();
    let metrics = Metrics::new(config.limits.request_deadline);
    let backend = Backend::build(&config.backend, &metrics)?;
    for ekm in backend.ekms() {
        tracing::info!(ekm = ?ekm.ekm_info(), "connected to the key manager");
    }
    let listen = config.listen;
    let admin = config.admin_listen;
    let app = server::app(config, backend, metrics)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("xks-worker");
    if let Some(plan) = pinning {
        runtime
            .worker_threads(plan.workers())
            .on_thread_start(|| plan.pin_worker());
    }
    let runtime = runtime.build()?;
    runtime.block_on(async move {
        let server = Server::bind(listen, admin, app, Some(config_path.to_owned())).await?;
        // Know the EKM's health before the first request and the first probe.
        let health = server.app().handler.monitor().check().await;
        tracing::info!(status = health.as_str(), "first health check done");
        let addr = server.local_addr()?;
        tracing::info!(%addr, "serving the XKS API");
        // Stable lines on stdout for scripts and tests that start us on port 0.
        // Written with `writeln!` and errors ignored: a closed stdout must not stop us.
        let mut out = std::io::stdout();
        let _ = writeln!(out, "xks-proxy listening on {addr}");
        if let Some(admin) = server.admin_addr() {
            let admin = admin?;
            tracing::info!(%admin, "serving metrics and probes over plain HTTP");
            let _ = writeln!(out, "xks-proxy admin listening on {admin}");
        }
        let _ = out.flush();
        server.run(shutdown_signal()).await;
        tracing::info!("stopped");
        Ok::<(), Error>(())
    })
}

/// `xks-proxy check-config`: everything `serve` reads before it opens the HSM.
fn check_config(path: &Path) -> Result<(), Error> {
    let lines = server::check_config(path)?;
    let mut out = std::io::stdout();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `xks-proxy hsm probe`: the library's probe (xks_proxy::hsm::pkcs11::probe), its
/// report printed.
fn hsm(action: HsmCommand) -> Result<(), Error> {
    use pkcs11::probe::{probe, ProbeSettings};
    use pkcs11::TokenSelector;
    let HsmCommand::Probe {
        module,
        token_label,
        token_serial,
        pin_file,
        config,
        key_label,
        sessions,
        sample_seconds,
        try_wrong_pin,
        json,
    } = action;
    let mut settings = ProbeSettings::resolve(
        config.as_deref(),
        module,
        token_label
            .map(TokenSelector::Label)
            .or(token_serial.map(TokenSelector::Serial)),
        pin_file.as_deref(),
    )?;
    if !(sample_seconds.is_finite() && (0.01..=60.0).contains(&sample_seconds)) {
        return Err("--sample-seconds must be between 0.01 and 60".into());
    }
    settings.key_label = key_label;
    settings.sessions = sessions.into_iter().filter(|n| *n > 0).collect();
    settings.sample_duration = std::time::Duration::from_secs_f64(sample_seconds);
    settings.try_wrong_pin = try_wrong_pin;
    let report = probe(&settings)?;
    let mut out = std::io::stdout();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&report)?);
    } else {
        let _ = write!(out, "{}", report.text());
    }
    let _ = out.flush();
    if report.serves_xks {
        Ok(())
    } else {
        Err(format!(
            "the module cannot serve XKS: {}",
            report.problems.join("; ")
        )
        .into())
    }
}

fn credentials(action: CredentialsCommand) -> Result<(), Error> {
    let CredentialsCommand::New {
        uri_prefix,
        secret_file,
    } = action;
    xks_proxy::router::normalize_prefix(&uri_prefix)?;
    let access_key_id = quickstart::random_access_key_id()?;
    let secret = quickstart::random_secret()?;
    let today = time::OffsetDateTime::now_utc().date();
    let secret_line = match &secret_file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            writeln!(file, "{}", secret.as_str())?;
            format!("secret_access_key_file = {:?}", path.display().to_string())
        }
        None => format!("secret_access_key = {:?}", secret.as_str()),
    };
    println!("# Add to the key store's configuration, next to the credential it replaces:");
    println!("[[key_store.credential]]");
    println!("access_key_id = \"{}\"", access_key_id.as_str());
    println!("{secret_line}");
    println!("created = \"{today}\"");
    println!();
    println!("# Then give KMS the new credential (console: import this file):");
    println!(
        "{}",
        quickstart::kms_console_json(&uri_prefix, &access_key_id, &secret)
    );
    Ok(())
}

fn keys(action: KeysCommand) -> Result<(), Error> {
    let (config_path, action) = match action {
        KeysCommand::Create {
            config,
            id,
            encrypt_only,
            decrypt_only,
            no_usage,
        } => {
            let usage = NewKeyUsage {
                encrypt: !no_usage && !decrypt_only,
                decrypt: !no_usage && !encrypt_only,
            };
            (config, KeyAction::Create { id, usage })
        }
        KeysCommand::List { config } => (config, KeyAction::List),
        KeysCommand::Disable { config, id } => (config, KeyAction::Disable(id)),
        KeysCommand::Enable { config, id } => (config, KeyAction::Enable(id)),
        KeysCommand::Rotate { config, id } => (config, KeyAction::Rotate(id)),
        KeysCommand::Destroy { config, id, .. } => (config, KeyAction::Destroy(id)),
    };
    let config = Config::load(&config_path)?;
    apply_environment(&config.environment);
    let report = pkcs11::administer(&config.backend, action)?;
    if let Some(note) = report.note {
        eprintln!("note: {note}");
    }
    for line in report.lines {
        println!("{line}");
    }
    Ok(())
}

fn run_quickstart(
    dir: &Path,
    listen: SocketAddr,
    module: Option<&Path>,
    setup_only: bool,
    logs: Option<&LogWriter>,
) -> Result<(), Error> {
    let prepared = quickstart::prepare(dir, listen, module)?;
    println!("xks-proxy quickstart ready in {}", prepared.dir.display());
    println!("  config:          {}", prepared.config.display());
    println!("  CA certificate:  {}", prepared.ca_certificate.display());
    println!(
        "  KMS console:     {}",
        prepared.dir.join("kms-console.json").display()
    );
    println!(
        "  test client env: {}",
        prepared.dir.join("test-client.env").display()
    );
    if let Some((name, value)) = &prepared.environment {
        println!("  module env:      {name}={}", value.display());
    }
    if setup_only {
        return Ok(());
    }
    println!(
        "\nTry it:\n{}\n",
        quickstart::curl_example(&prepared, listen.port())
    );
    serve(&prepared.config, logs)
}
