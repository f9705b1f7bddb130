//! `uplift events` (the server's event stream, one JSON object a line) and
//! `uplift webhook ...` (receivers of the same events, and their delivery
//! log).

use crate::cli::{print_as, print_json, ServerArgs};
use crate::output::table;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use uplift_proto::events::{
    DeliveryView, EventFilter, EventStreamQuery, Subject, WebhookCreate, WebhookView,
};
use uplift_proto::DeviceId;

#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only events about devices, or about rollouts.
    #[arg(long)]
    subject: Option<Subject>,
    /// Only events about this device.
    #[arg(long)]
    device: Option<DeviceId>,
    /// Only events about this rollout.
    #[arg(long)]
    rollout: Option<i64>,
}

impl From<FilterArgs> for EventFilter {
    fn from(a: FilterArgs) -> Self {
        EventFilter {
            subject: a.subject,
            device: a.device,
            rollout: a.rollout,
        }
    }
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Stop after this many events (default: until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// First print up to this many of the newest past events (at most 1000).
    #[arg(long, value_name = "N")]
    recent: Option<u32>,
    /// Resume after this event (its `seq`): first print the later ones the
    /// server still holds, as a client that lost its stream would.
    #[arg(long, value_name = "SEQ", conflicts_with = "recent")]
    after_event: Option<u64>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Deliver events to a URL (POST, JSON, HMAC-signed); prints the secret once.
    Create {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop delivering to a webhook (its delivery log stays).
    Remove {
        id: i64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// A webhook's delivery log, newest first.
    Deliveries {
        id: i64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Prints each event of the stream as one line of JSON as it comes.
pub async fn events(args: EventsArgs) -> anyhow::Result<i32> {
    let client = args.server.client()?;
    let filter = EventFilter::from(args.filter);
    let query = EventStreamQuery {
        subject: filter.subject,
        device: filter.device,
        rollout: filter.rollout,
        recent: args.recent,
    };
    let response = client.event_stream(&query, args.after_event).await?;
    let mut stream = eventsource_stream::EventStream::new(response.bytes_stream());
    let mut seen = 0u64;
    while let Some(event) = stream.next().await {
        let event = event.map_err(|e| anyhow::anyhow!("the event stream broke: {e}"))?;
        if event.event == "lagged" {
            eprintln!(
                "warning: this stream fell behind and missed events: {}",
                event.data
            );
            continue;
        }
        println!("{}", event.data);
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            return Ok(0);
        }
    }
    anyhow::bail!("the server ended the event stream (is it shutting down?)")
}

fn filter_text(f: &EventFilter) -> String {
    let mut parts = Vec::new();
    if let Some(s) = f.subject {
        parts.push(format!("subject={}", <&str>::from(s)));
    }
    if let Some(d) = &f.device {
        parts.push(format!("device={d}"));
    }
    if let Some(r) = f.rollout {
        parts.push(format!("rollout={r}"));
    }
    if parts.is_empty() {
        "every event".to_owned()
    } else {
        parts.join(" ")
    }
}

pub fn webhooks_table(hooks: &[WebhookView]) -> String {
    let rows: Vec<Vec<String>> = hooks
        .iter()
        .map(|w| {
            vec![
                w.id.to_string(),
                w.url.clone(),
                filter_text(&w.filter),
                w.created_by.clone(),
                match &w.removed_at {
                    Some(at) => format!("removed {at}"),
                    None => "active".into(),
                },
            ]
        })
        .collect();
    table(&["ID", "URL", "EVENTS", "CREATED BY", "STATUS"], &rows)
}

pub fn deliveries_table(deliveries: &[DeliveryView]) -> String {
    let rows: Vec<Vec<String>> = deliveries
        .iter()
        .map(|d| {
            let status = serde_json::to_value(d.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            vec![
                d.id.to_string(),
                d.event.clone(),
                status,
                d.attempts.to_string(),
                d.created_at.clone(),
                match (&d.last_error, d.last_status) {
                    (Some(e), _) => e.message.clone(),
                    (None, Some(code)) => format!("answered {code}"),
                    (None, None) => String::new(),
                },
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "EVENT",
            "STATUS",
            "ATTEMPTS",
            "CREATED",
            "LAST RESULT",
        ],
        &rows,
    )
}

pub async fn webhook(cmd: WebhookCommand) -> anyhow::Result<i32> {
    match cmd {
        WebhookCommand::Create {
            url,
            filter,
            json,
            server,
        } => {
            let request = WebhookCreate {
                url,
                filter: filter.into(),
            };
            let made = server.client()?.create_webhook(&request).await?;
            if json {
                print_json(&made)?;
            } else {
                println!("{}", webhooks_table(std::slice::from_ref(&made.webhook)));
                println!();
                println!("signing secret (shown only now): {}", made.secret);
                println!(
                    "each delivery carries x-uplift-signature: sha256=HMAC-SHA256(secret, \
                     x-uplift-timestamp + \".\" + body)"
                );
            }
        }
        WebhookCommand::List { json, server } => {
            let hooks = server.client()?.webhooks().await?;
            print_as(json, &hooks, |h| webhooks_table(h))?;
        }
        WebhookCommand::Remove { id, json, server } => {
            let hook = server.client()?.remove_webhook(id).await?;
            print_as(json, &hook, |h| webhooks_table(std::slice::from_ref(h)))?;
        }
        WebhookCommand::Deliveries {
            id,
            limit,
            json,
            server,
        } => {
            let deliveries = server.client()?.deliveries(id, limit).await?;
            print_as(json, &deliveries, |d| deliveries_table(d))?;
        }
    }
    Ok(0)
}
