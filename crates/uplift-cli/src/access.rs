//! `uplift token ...`, `uplift audit` and `uplift whoami`: who may use the
//! admin API, and what was done with it.

use crate::cli::{print_as, print_json, ServerArgs};
use crate::output::table;
use clap::{Args, Subcommand};
use std::num::NonZeroU64;
use std::time::Duration;
use uplift_proto::auth::{AuditAction, AuditEntry, AuditQuery, Role, TokenCreate, TokenView};
use uplift_proto::TokenName;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make an API token with a role; its secret is printed once, here.
    Create {
        /// A label for it, shown in the token list and the audit log.
        #[arg(long)]
        name: TokenName,
        /// viewer, operator, release-manager or admin.
        #[arg(long)]
        role: Role,
        /// The token stops working after this long (e.g. 90d, 12h).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        /// An enrollment token enrolls at most N new devices; the next is
        /// refused, told the token is used up.
        #[arg(long, value_name = "N")]
        max_uses: Option<std::num::NonZeroU32>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke a token: its next request is refused.
    Revoke {
        id: i64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this actor, as the log names it (e.g. "token 3 (ci)").
    #[arg(long)]
    actor: Option<String>,
    /// Only this action (e.g. rollout.start, token.revoke).
    #[arg(long)]
    action: Option<AuditAction>,
    /// Only this target (e.g. "rollout 3").
    #[arg(long)]
    target: Option<String>,
    /// Entries older than this entry id (the "next" of the previous page).
    #[arg(long)]
    before: Option<i64>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

pub fn tokens_table(tokens: &[TokenView]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let mut status = match (&t.revoked_at, &t.expires_at) {
                (Some(at), _) => format!("revoked {at}"),
                (None, Some(at)) => format!("expires {at}"),
                (None, None) => "active".to_owned(),
            };
            if let Some(max) = t.max_uses {
                status.push_str(&format!(", used {} of {max}", t.uses));
            }
            vec![
                t.id.to_string(),
                t.name.to_string(),
                t.role.to_string(),
                t.created_by.clone(),
                t.created_at.clone(),
                status,
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "ROLE", "CREATED BY", "CREATED", "STATUS"],
        &rows,
    )
}

pub fn audit_table(entries: &[AuditEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let result = match &e.error {
                None => "ok".to_owned(),
                Some(err) => format!("{}: {}", err.kind, err.message),
            };
            vec![
                e.id.to_string(),
                e.at.clone(),
                e.actor.clone(),
                e.action.to_string(),
                e.target.clone(),
                result,
            ]
        })
        .collect();
    table(&["ID", "AT", "ACTOR", "ACTION", "TARGET", "RESULT"], &rows)
}

pub async fn token(cmd: TokenCommand) -> anyhow::Result<i32> {
    match cmd {
        TokenCommand::Create {
            name,
            role,
            expires_in,
            max_uses,
            json,
            server,
        } => {
            let request = TokenCreate {
                name,
                role,
                expires_in_secs: expires_in.and_then(|d| NonZeroU64::new(d.as_secs())),
                max_uses,
            };
            if expires_in.is_some() && request.expires_in_secs.is_none() {
                anyhow::bail!("--expires-in must be at least one second");
            }
            let created = server.client()?.create_token(&request).await?;
            if json {
                print_json(&created)?;
            } else {
                println!("{}", tokens_table(std::slice::from_ref(&created.token)));
                println!();
                println!("secret (shown only now; the server keeps only its digest):");
                println!("{}", created.secret);
            }
        }
        TokenCommand::List { json, server } => {
            let tokens = server.client()?.tokens().await?;
            print_as(json, &tokens, |t| tokens_table(t))?;
        }
        TokenCommand::Revoke { id, json, server } => {
            let token = server.client()?.revoke_token(id).await?;
            print_as(json, &token, |t| tokens_table(std::slice::from_ref(t)))?;
        }
    }
    Ok(0)
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<i32> {
    let query = AuditQuery {
        actor: args.actor,
        action: args.action,
        target: args.target,
        before: args.before,
        limit: Some(args.limit),
    };
    let page = args.server.client()?.audit(&query).await?;
    if args.json {
        print_json(&page)?;
    } else {
        println!("{}", audit_table(&page.entries));
        if let Some(next) = page.next {
            println!("(older entries: --before {next})");
        }
    }
    Ok(0)
}

pub async fn whoami(server: ServerArgs, json: bool) -> anyhow::Result<i32> {
    let caller = server.client()?.whoami().await?;
    print_as(json, &caller, |c| format!("{} (role {})", c.name, c.role))?;
    Ok(0)
}
