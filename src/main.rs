//! The `herald` command line: run the relay and the postmaster's tools.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use herald::config::{self, Config};

/// `herald --version`: the release and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("HERALD_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "herald",
    version = VERSION,
    about = "Outbound SMTP relay for applications"
)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve,
    /// Load and validate the config; print every problem with its key path.
    CheckConfig,
    /// Read a password on standard input and print its argon2id hash for
    /// `password_hash`.
    HashPassword,
    /// Send test messages to an SMTP server and report throughput and latency.
    Loadgen(LoadgenArgs),
    /// Diagnose an SMTP server a tenant wants to send through: each step ok,
    /// or its likely cause and fix. Sends no message.
    SmtpTest(herald::diagnose::smtp_test::Args),
    /// Inspect and steer the queue of the running relay (through its admin API).
    Queue {
        #[command(subcommand)]
        command: herald::admin::cli::QueueCommand,
    },
    /// The per-tenant suppression list of the running relay (through its
    /// admin API).
    Suppression {
        #[command(subcommand)]
        command: herald::admin::suppressions::SuppressionCommand,
    },
    /// `suspend`/`resume domain D|tenant T`, `suspensions`, `tenant
    /// show|resume NAME`: delivery suspensions and reputation pauses of the
    /// running relay (through its admin API).
    #[command(flatten)]
    Control(herald::admin::control::ControlCommand),
    /// DKIM keys: `dkim keygen --domain D --selector S` writes a key under
    /// certs/dkim/ and prints the DNS TXT record to publish.
    Dkim {
        #[command(subcommand)]
        command: herald::policy::dkim::DkimCommand,
    },
    /// Sending domains: `domain check D` checks MX, SPF, DKIM, DMARC,
    /// MTA-STS and TLS-RPT for herald's mail and prints the records to publish.
    Domain {
        #[command(subcommand)]
        command: herald::diagnose::domain_check::DomainCommand,
    },
    /// Transport security of a destination: `tls check DOMAIN` says which
    /// TLS policy applies (DANE, MTA-STS, config) and what each MX host
    /// presents, and whether delivery would succeed.
    Tls {
        #[command(subcommand)]
        command: herald::diagnose::tls_check::TlsCommand,
    },
    /// Bounces: `bounce parse FILE [--json]` prints what herald reads from
    /// a bounce or complaint and whether it would suppress the address.
    Bounce {
        #[command(subcommand)]
        command: herald::bounces::explain::BounceCommand,
    },
    /// DNS blocklists: `dnsbl check [IP...]` tells whether herald's sending
    /// IPs (or the ones given) are listed in the configured zones.
    Dnsbl {
        #[command(subcommand)]
        command: herald::policy::dnsbl::DnsblCommand,
    },
    /// Have the running relay re-read its config file (as SIGHUP does):
    /// tenants, TLS certificate, DKIM keys, policy and rate limits apply to
    /// new connections; prints what needs a restart, or every problem.
    Reload,
    /// Print a shell completion script: `herald completions bash >
    /// /etc/bash_completion.d/herald` (also zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `herald man > herald.1`.
    Man,
}

#[derive(clap::Args)]
struct LoadgenArgs {
    /// HOST:PORT of the SMTP server.
    #[arg(long)]
    target: String,
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Approximate message size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// USER:PASS for AUTH PLAIN.
    #[arg(long)]
    auth: Option<String>,
    /// Use STARTTLS.
    #[arg(long, conflicts_with = "tls")]
    starttls: bool,
    /// Use implicit TLS (port 465 style).
    #[arg(long)]
    tls: bool,
    #[arg(long, default_value = "loadgen@example.com")]
    from: String,
    #[arg(long, default_value = "sink@example.net")]
    to: String,
    /// One connection per message instead of reusing connections.
    #[arg(long)]
    no_reuse: bool,
}

/// Writes generated text to standard output; a reader that stops early
/// (`| head`) is not an error.
fn print_out(what: &str, bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve => {
            let Some(cfg) = load(&cli.config) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(herald::server::run_until_signal(cfg, &cli.config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig => match load(&cli.config) {
            Some(cfg) => match rt.block_on(herald::server::check(&cfg)) {
                Ok(()) => {
                    println!(
                        "{}: ok ({} listener(s), {} tenant(s))",
                        cli.config.display(),
                        cfg.listeners.len(),
                        cfg.tenants.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(errs) => {
                    eprintln!(
                        "{}: {} problem(s):\n{errs}",
                        cli.config.display(),
                        errs.0.len()
                    );
                    ExitCode::FAILURE
                }
            },
            None => ExitCode::FAILURE,
        },
        Command::HashPassword => hash_password(),
        Command::Queue { command } => {
            let Some(cfg) = load(&cli.config) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(herald::admin::cli::run(&cfg.admin, command)) {
                Ok(out) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald queue: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Suppression { command } => {
            let Some(cfg) = load(&cli.config) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(herald::admin::suppressions::run(&cfg.admin, command)) {
                Ok(out) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald suppression: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Control(command) => {
            let Some(cfg) = load(&cli.config) else {
                return ExitCode::FAILURE;
            };
            let name = command.name();
            match rt.block_on(herald::admin::control::run(&cfg.admin, command)) {
                Ok(out) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald {name}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::SmtpTest(a) => herald::diagnose::smtp_test::cli(a, &rt),
        Command::Dkim { command } => herald::policy::dkim::cli(command),
        Command::Domain { command } => {
            herald::diagnose::domain_check::cli(command, &cli.config, &rt)
        }
        Command::Tls { command } => herald::diagnose::tls_check::cli(command, &cli.config, &rt),
        Command::Dnsbl { command } => herald::policy::dnsbl::cli(&cli.config, command, &rt),
        Command::Reload => {
            let Some(cfg) = load(&cli.config) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(herald::admin::cli::reload(&cfg.admin)) {
                Ok(out) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald reload: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "herald", &mut script);
            print_out("completions", &script)
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => print_out("man", &page),
                Err(e) => {
                    eprintln!("herald man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bounce { command } => herald::bounces::explain::cli(&cli.config, command),
        Command::Loadgen(a) => {
            use herald::loadgen::{LoadgenOptions, LoadgenTls};
            let auth = match a.auth.as_deref().map(|s| s.split_once(':')) {
                None => None,
                Some(Some((u, p))) => Some((u.to_string(), config::Secret::new(p))),
                Some(None) => {
                    eprintln!("herald loadgen: --auth takes USER:PASS");
                    return ExitCode::FAILURE;
                }
            };
            let opts = LoadgenOptions {
                target: a.target,
                messages: a.messages,
                concurrency: a.concurrency,
                size: a.size,
                auth,
                tls: if a.tls {
                    LoadgenTls::Implicit
                } else if a.starttls {
                    LoadgenTls::StartTls
                } else {
                    LoadgenTls::None
                },
                from: a.from,
                to: a.to,
                reuse: !a.no_reuse,
                progress: std::io::stderr().is_terminal(),
                ..LoadgenOptions::default()
            };
            match rt.block_on(herald::loadgen::run(opts)) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald loadgen: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn load(path: &std::path::Path) -> Option<Config> {
    Config::load_or_print(path)
}

fn hash_password() -> ExitCode {
    use std::io::BufRead;
    eprint!("Password (read from standard input): ");
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        eprintln!("herald: cannot read the password");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("herald: empty password");
        return ExitCode::FAILURE;
    }
    eprintln!();
    match herald::receive::auth::hash_password(password) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = herald::server::log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    // A panic goes to the service log like any error, with where it
    // happened; the task that caught it adds what it was doing.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = what, at = %at, "bug: a task panicked");
    }));
}
