//! `switchboard`: the server binary. `serve` runs it; `admin …` manages workspaces,
//! tokens and the event log, and works while the server runs.

mod config;
mod http;
mod server;
mod workspaces;

use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's malloc. Memory goes from thread to thread here at every step
/// (an HTTP worker builds a write, the writer frees it; the writer builds events, sessions
/// free them), and glibc frees another thread's chunk under its arena's lock and
/// consolidates its fastbins before large allocations. The writer alone ran 2.4× as many
/// appends a second with it (`persistence_bench`, `docs/performance.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Realtime chat and streaming server"
)]
struct Cli {
    /// Configuration file (`key = value` lines, `[realtime]` section).
    #[arg(long, global = true)]
    config: Option<String>,
    /// Database URL, e.g. sqlite://data/switchboard.db
    #[arg(long, global = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[arg(long)]
        bind: Option<String>,
        /// Fan-out between nodes: `local` (default) or `redis://host:port[/db]` (cluster).
        #[arg(long)]
        broker: Option<String>,
        /// Ensure a demo workspace with members alice, bob and helper and print tokens.
        #[arg(long)]
        demo: bool,
    },
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Workspaces (tenants).
    Workspace {
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
    /// Mint a bearer token for an entity.
    Token {
        #[arg(long)]
        workspace: String,
        #[arg(long)]
        entity: String,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: i64,
    },
    /// The durable event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        secret: Option<String>,
    },
    List,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Delete old events; messages are untouched. Clients holding a pruned cursor get 4001.
    Prune {
        #[arg(long)]
        workspace: String,
        #[arg(long, conflicts_with = "before")]
        older_than_days: Option<i64>,
        #[arg(long)]
        before: Option<String>,
        #[arg(long)]
        keep_latest: Option<i64>,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<(), String> {
    let mut config = config::Config::load(cli.config.as_deref())?;
    if let Some(db) = cli.database {
        config.database = db;
    }
    match cli.command {
        Command::Serve { bind, broker, demo } => {
            if let Some(b) = bind {
                config.bind = b;
            }
            if let Some(b) = broker {
                config.broker = config::parse_broker(&b)?;
            }
            server::serve(config, demo)
        }
        Command::Admin { command } => admin(config, command),
    }
}

fn open(config: &config::Config) -> Result<switchboard_actors::store::DbPool, String> {
    let url = switchboard_actors::store::DatabaseUrl::parse(&config.database)?;
    switchboard_actors::store::open(&url, 2)
}

fn admin(config: config::Config, command: AdminCommand) -> Result<(), String> {
    use switchboard_actors::store::queries;
    let pool = open(&config)?;
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    match command {
        AdminCommand::Workspace {
            command:
                WorkspaceCommand::Create {
                    name,
                    id,
                    key,
                    secret,
                },
        } => {
            let w = workspaces::create(
                &mut conn,
                workspaces::NewWorkspace {
                    id,
                    name,
                    key,
                    secret,
                },
            )
            .map_err(|e| e.message)?;
            println!("{}", workspaces::to_json(&w));
        }
        AdminCommand::Workspace {
            command: WorkspaceCommand::List,
        } => {
            for w in queries::list_workspaces(&mut conn).map_err(|e| e.to_string())? {
                println!("{}\t{}\t{}", w.id, w.key, w.name);
            }
        }
        AdminCommand::Token {
            workspace,
            entity,
            ttl_seconds,
        } => {
            let w = queries::workspace_by_id(&mut conn, &workspace)
                .map_err(|e| e.to_string())?
                .ok_or("no such workspace")?;
            queries::entity(&mut conn, &w.id, &entity)
                .map_err(|e| e.to_string())?
                .filter(|e| e.active)
                .ok_or("no such entity")?;
            let now = chrono::Utc::now().timestamp();
            let (token, _) = switchboard_actors::auth::mint_token(
                &w.key,
                &w.secret,
                &entity,
                ttl_seconds,
                None,
                now,
            )
            .map_err(|e| e.message)?;
            println!("{token}");
        }
        AdminCommand::Events {
            command:
                EventsCommand::Prune {
                    workspace,
                    older_than_days,
                    before,
                    keep_latest,
                },
        } => {
            let cutoff = prune_cutoff(older_than_days, before.as_deref())?;
            let keep = keep_latest.unwrap_or(0);
            if keep < 0 {
                return Err("--keep-latest must not be negative".into());
            }
            if cutoff.is_none() && keep_latest.is_none() {
                return Err(
                    "give at least one bound: --older-than-days, --before or --keep-latest".into(),
                );
            }
            queries::workspace_by_id(&mut conn, &workspace)
                .map_err(|e| e.to_string())?
                .ok_or("no such workspace")?;
            let n = queries::prune_events(&mut conn, &workspace, cutoff.as_deref(), keep)
                .map_err(|e| e.to_string())?;
            println!("pruned {n} events");
        }
    }
    Ok(())
}

fn prune_cutoff(
    older_than_days: Option<i64>,
    before: Option<&str>,
) -> Result<Option<String>, String> {
    match (older_than_days, before) {
        (Some(_), Some(_)) => Err("--older-than-days and --before exclude each other".into()),
        (Some(d), None) if d < 0 => Err("--older-than-days must not be negative".into()),
        (Some(d), None) => Ok(Some(switchboard_actors::ids::to_rfc3339(
            chrono::Utc::now() - chrono::Duration::days(d),
        ))),
        (None, Some(b)) => chrono::DateTime::parse_from_rfc3339(b)
            .map(|t| {
                Some(switchboard_actors::ids::to_rfc3339(
                    t.with_timezone(&chrono::Utc),
                ))
            })
            .map_err(|_| "--before must be an RFC 3339 timestamp".into()),
        (None, None) => Ok(None),
    }
}
